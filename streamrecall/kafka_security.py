"""Kafka security settings: the combinations that can work, and what kafka-python receives.

kafka-python accepts any mix of options and fails late — at the first connection, often with a
message about something else (a SASL mechanism under ``SSL`` is silently unused; OAUTHBEARER
without a token provider fails inside the handshake). Here each combination that cannot work is
refused before a client is built, with a message that says what to set instead.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamrecall.errors import ConfigError

if TYPE_CHECKING:  # settings imports this module
    from streamrecall.settings import Settings

SASL_PROTOCOLS = ("SASL_PLAINTEXT", "SASL_SSL")
SSL_PROTOCOLS = ("SSL", "SASL_SSL")
#: Mechanisms that authenticate with sasl_plain_username / sasl_plain_password.
PASSWORD_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_SSL_OPTIONS = ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_password", "ssl_crlfile", "ssl_ciphers")


def check_security(s: "Settings") -> None:
    """Refuse security settings that cannot work together; each message names the setting."""
    mechanism = s.sasl_mechanism
    if s.security_protocol in SASL_PROTOCOLS and mechanism is None:
        raise ConfigError(f"sasl_mechanism: required when security_protocol is {s.security_protocol} "
                          f"(one of {', '.join(PASSWORD_MECHANISMS)}, OAUTHBEARER, GSSAPI)")
    if mechanism is not None and s.security_protocol not in SASL_PROTOCOLS:
        raise ConfigError(f"sasl_mechanism: {mechanism} needs security_protocol SASL_PLAINTEXT or SASL_SSL "
                          f"(it is {s.security_protocol}); set both, or neither")
    _check_password_mechanism(s)
    _check_oauth(s)
    _check_gssapi(s)
    _check_ssl(s)


def _check_password_mechanism(s: "Settings") -> None:
    if s.sasl_mechanism in PASSWORD_MECHANISMS:
        for name in ("sasl_plain_username", "sasl_plain_password"):
            if getattr(s, name) is None:
                raise ConfigError(f"{name}: required for sasl_mechanism {s.sasl_mechanism} "
                                  f"(--{_flag(name)} or STREAMRECALL_{name.upper()})")
    else:
        for name in ("sasl_plain_username", "sasl_plain_password"):
            if getattr(s, name) is not None:
                raise ConfigError(f"{name}: only used by sasl_mechanism {', '.join(PASSWORD_MECHANISMS)}; "
                                  f"set one of them, or drop {name}")


def _check_oauth(s: "Settings") -> None:
    if s.sasl_mechanism == "OAUTHBEARER":
        if s.sasl_oauth_token_provider is None:
            raise ConfigError("sasl_oauth_token_provider: required for sasl_mechanism OAUTHBEARER; name a "
                              "kafka-python AbstractTokenProvider as module:attribute (for example mycorp.kafka:tokens)")
        token_provider(s.sasl_oauth_token_provider)  # refuse one that cannot be loaded, now
    elif s.sasl_oauth_token_provider is not None:
        raise ConfigError("sasl_oauth_token_provider: only used by sasl_mechanism OAUTHBEARER; set it, "
                          "or drop the token provider")


def _check_gssapi(s: "Settings") -> None:
    if s.sasl_mechanism == "GSSAPI":
        # kafka-python imports gssapi only when it connects, and then fails with "GSSAPI lib not found!".
        if importlib.util.find_spec("gssapi") is None:
            raise ConfigError("sasl_mechanism: GSSAPI needs the Python package gssapi (pip install gssapi) "
                              "and a Kerberos ticket or keytab for this process")
    elif s.sasl_kerberos_service_name is not None:
        raise ConfigError("sasl_kerberos_service_name: only used by sasl_mechanism GSSAPI; set it, or drop "
                          "the service name")


def _check_ssl(s: "Settings") -> None:
    if s.security_protocol not in SSL_PROTOCOLS:
        for name in _SSL_OPTIONS:
            if getattr(s, name) is not None:
                raise ConfigError(f"{name}: only used with security_protocol SSL or SASL_SSL "
                                  f"(it is {s.security_protocol}); set the protocol, or drop {name}")
        if not s.ssl_check_hostname:
            raise ConfigError(f"ssl_check_hostname: only used with security_protocol SSL or SASL_SSL "
                              f"(it is {s.security_protocol})")
    for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_crlfile"):
        path: Path | None = getattr(s, name)
        if path is not None and not path.is_file():
            raise ConfigError(f"{name}: {path} is not a readable file")
    if s.ssl_keyfile is not None and s.ssl_certfile is None:
        raise ConfigError("ssl_keyfile: a client key needs its certificate; set ssl_certfile too")
    if s.ssl_password is not None and s.ssl_keyfile is None and s.ssl_certfile is None:
        raise ConfigError("ssl_password: it unlocks the client key; set ssl_certfile (and ssl_keyfile) too")


def security_config(s: "Settings") -> dict[str, Any]:
    """The security options for a kafka-python client (secrets revealed: only clients see them)."""
    conf: dict[str, Any] = {"security_protocol": s.security_protocol}
    optional = {
        "sasl_mechanism": s.sasl_mechanism,
        "sasl_plain_username": s.sasl_plain_username,
        "sasl_plain_password": s.sasl_plain_password.reveal() if s.sasl_plain_password else None,
        "sasl_kerberos_service_name": s.sasl_kerberos_service_name,
        "sasl_oauth_token_provider": (token_provider(s.sasl_oauth_token_provider)
                                      if s.sasl_oauth_token_provider else None),
        "ssl_cafile": str(s.ssl_cafile) if s.ssl_cafile else None,
        "ssl_certfile": str(s.ssl_certfile) if s.ssl_certfile else None,
        "ssl_keyfile": str(s.ssl_keyfile) if s.ssl_keyfile else None,
        "ssl_password": s.ssl_password.reveal() if s.ssl_password else None,
        "ssl_crlfile": str(s.ssl_crlfile) if s.ssl_crlfile else None,
        "ssl_ciphers": s.ssl_ciphers,
    }
    conf.update({k: v for k, v in optional.items() if v is not None})
    if s.security_protocol in SSL_PROTOCOLS:
        conf["ssl_check_hostname"] = s.ssl_check_hostname
    return conf


@functools.lru_cache(maxsize=None)
def token_provider(spec: str) -> Any:
    """The OAUTHBEARER token provider named ``module:attribute``: an instance of kafka-python's
    ``AbstractTokenProvider``, or a subclass of it (made with no arguments). One object per
    spec and process, so every client shares it and its token cache."""
    from kafka.net.sasl.oauth import AbstractTokenProvider

    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigError(f"sasl_oauth_token_provider: {spec!r} is not module:attribute (for example "
                          "mycorp.kafka:tokens)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"sasl_oauth_token_provider: cannot import {module_name!r} ({exc}); "
                          "install it or fix the name") from None
    provider = getattr(module, attribute, None)
    if isinstance(provider, type) and issubclass(provider, AbstractTokenProvider):
        provider = provider()
    if not isinstance(provider, AbstractTokenProvider):
        raise ConfigError(f"sasl_oauth_token_provider: {spec!r} is {type(provider).__name__}, not a "
                          "kafka.net.sasl.oauth.AbstractTokenProvider (an instance, or a subclass made with no arguments)")
    return provider


def _flag(name: str) -> str:
    return {"sasl_plain_username": "sasl-username", "sasl_plain_password": "sasl-password"}.get(
        name, name.replace("_", "-"))
