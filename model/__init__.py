"""The learning core: features, towers, frequency estimator, loss, online trainer, updates.

Pure PyTorch; no Kafka here (see docs/model.md).
"""

from streamrecall.model.batch import ClickLike, TrainBatch
from streamrecall.model.catalog import ItemCatalog
from streamrecall.model.config import ModelConfig
from streamrecall.model.errors import CheckpointError, ModelConfigError, ModelError, ModelUpdateError, ModelUpdateRefused
from streamrecall.model.features import Featurizer, ItemFeatures, ItemLike, UserFeatures, hash64, item_key
from streamrecall.model.frequency import FrequencyEstimator
from streamrecall.model.history import RecentHistory
from streamrecall.model.loss import sampled_softmax_loss
from streamrecall.model.replay import ReplayBuffer, ReplaySample
from streamrecall.model.replica import Applied, TowerReplica
from streamrecall.model.fm import FactorizationMachine
from streamrecall.model.towers import TABLES, ItemTower, TwoTower, UserTower, build_model
from streamrecall.model.trainer import OnlineTrainer
from streamrecall.model.trending import TrendingCounter
from streamrecall.model.update import ModelUpdate, SparseRows, decode_update, encode_update

__all__ = [
    "Applied", "CheckpointError", "ClickLike", "FactorizationMachine", "Featurizer", "FrequencyEstimator", "ItemCatalog", "ItemFeatures",
    "ItemLike", "ItemTower", "ModelConfig", "ModelConfigError", "ModelError", "ModelUpdate", "ModelUpdateError", "ModelUpdateRefused",
    "OnlineTrainer", "RecentHistory", "ReplayBuffer", "ReplaySample", "SparseRows", "TABLES", "TowerReplica", "TrainBatch", "TrendingCounter",
    "TwoTower", "UserFeatures", "UserTower", "build_model", "decode_update", "encode_update", "hash64", "item_key",
    "sampled_softmax_loss",
]
