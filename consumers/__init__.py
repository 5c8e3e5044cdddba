"""Kafka I/O: the poll/commit runtime, dead-letter routing and the three roles.

This is where Kafka, the model and the index meet; ``streamrecall.model`` and
``streamrecall.index`` never import Kafka.
"""
