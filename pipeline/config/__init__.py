"""The one typed configuration of every role (schema.py), read from config.yaml and
validated once (loader.py), and the one place the environment is read (environment.py)."""
from pipeline.config.environment import (
                                         ENV_OVERRIDES,
                                         ENV_RETIRED,
                                         client_credentials,
                                         env_flag,
                                         gpu_path_on_cpu,
                                         grpc_server_address,
                                         parse_duration,
                                         retired_environment,
)
from pipeline.config.loader import load_config, parse_config
from pipeline.config.schema import (
                                         DEFAULT_CONFIG_PATH,
                                         LOCAL_ORIGINS,
                                         AuthConfig,
                                         BatchingConfig,
                                         CapacityConfig,
                                         CompositeMode,
                                         CompositorConfig,
                                         Config,
                                         ConfigError,
                                         GpusConfig,
                                         ModelConfig,
                                         OpsConfig,
                                         OutputConfig,
                                         Provider,
                                         RuntimeConfig,
                                         ServerConfig,
                                         StreamingConfig,
                                         TlsConfig,
                                         UnetPrecision,
                                         parse_origin,
                                         setting,
)

__all__ = ["DEFAULT_CONFIG_PATH", "ENV_OVERRIDES", "ENV_RETIRED", "LOCAL_ORIGINS", "AuthConfig",
           "BatchingConfig", "CapacityConfig", "CompositeMode", "CompositorConfig", "Config",
           "ConfigError", "GpusConfig", "ModelConfig", "OpsConfig", "OutputConfig", "Provider",
           "RuntimeConfig", "ServerConfig", "StreamingConfig", "TlsConfig", "UnetPrecision",
           "client_credentials", "env_flag", "gpu_path_on_cpu", "grpc_server_address", "load_config",
           "parse_config", "parse_duration", "parse_origin", "retired_environment", "setting"]
