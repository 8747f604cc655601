"""The shipped FSDP2 accelerate config parses as accelerate reads it, and the engine's wrapper names the decoder-layer
class that its transformer-based wrap makes one shard unit each."""

from pathlib import Path

from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import DistributedType

from ecliptica.train.policy import PolicyModel

from .train_helpers import tiny_lora_llama

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "fsdp2.yaml"


def test_shipped_fsdp2_config_parses():
    cfg = load_config_from_file(str(CONFIG))
    assert cfg.distributed_type == DistributedType.FSDP and cfg.num_processes == 2
    assert cfg.fsdp_config["fsdp_version"] == 2
    assert cfg.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert "fsdp_transformer_layer_cls_to_wrap" not in cfg.fsdp_config  # read from the model, whatever it is


def test_policy_wrapper_names_the_decoder_layer_class():
    policy = PolicyModel(tiny_lora_llama(intermediate_size=32, vocab_size=64, b_std=0.0))
    assert policy._no_split_modules == ["LlamaDecoderLayer"]
