"""The readers of a Hugging Face directory (safetensors headers, the shard index, config.json) and of
our checkpoint metadata, given generated input: each reads it or stops with one error of its own
naming the file, never an exception from a library below."""

import json
import struct

import pytest
import torch
from bad_input import json_values, texts
from hypothesis import example, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from megatron_r1.arguments import build_parser
from megatron_r1.checkpointing import METADATA_FILE, MODEL_FUNCTION_ARGS, MODEL_SHAPE_ARGS, CheckpointError
from megatron_r1.hf.config import UnsupportedModelError, checkpoint_args
from megatron_r1.hf.import_ import read_hf_model_flags
from megatron_r1.hf.model_flags import transformers_defaults
from megatron_r1.hf.storage import SAFETENSORS_INDEX, SINGLE_SAFETENSORS, SafetensorsReader, WeightsError

FUZZ = settings(max_examples=40, derandomize=True, deadline=None)

# A small DeepSeek-V3 config.json that converts (MLA with q compression, yarn, MoE with groups, MTP).
CONFIG = {"model_type": "deepseek_v3", "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_size": 32,
          "intermediate_size": 64, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
          "v_head_dim": 8, "max_position_embeddings": 32, "vocab_size": 100, "rms_norm_eps": 1e-6, "rope_theta": 10000,
          "tie_word_embeddings": False, "rope_scaling": {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 8,
          "mscale": 1.0, "mscale_all_dim": 1.0}, "first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2,
          "n_shared_experts": 2, "moe_intermediate_size": 16, "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
          "norm_topk_prob": True, "num_nextn_predict_layers": 1}  # fmt: skip
# DeepSeek-V2-Lite's kind (softmax routing, no q compression) and Qwen3-MoE's (GQA, q/k norms, a dense layer).
V2_CONFIG = {**{name: value for name, value in CONFIG.items() if name not in ("q_lora_rank", "num_nextn_predict_layers")},
             "model_type": "deepseek_v2", "q_lora_rank": None, "topk_method": "greedy", "n_group": 1, "topk_group": 1,
             "routed_scaling_factor": 1.0, "norm_topk_prob": False, "scoring_func": "softmax"}  # fmt: skip
QWEN3_MOE_CONFIG = {"model_type": "qwen3_moe", "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                    "head_dim": 16, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
                    "num_experts": 4, "num_experts_per_tok": 2, "norm_topk_prob": True, "mlp_only_layers": [0],
                    "max_position_embeddings": 32, "vocab_size": 100, "rope_theta": 1000000}  # fmt: skip
numbers = st.integers(-3, 10**12) | st.floats(allow_nan=True, allow_infinity=True)


def _header_file(header, data_length: int, declared_extra: int) -> bytes:
    encoded = json.dumps(header).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", max(0, len(encoded) + declared_extra)) + encoded + b"\0" * data_length


tensor_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "F8_E4M3", "XX"]) | json_values,
        "shape": st.lists(st.integers(-1, 4), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-1, 64), min_size=2, max_size=2) | json_values,
    }
)
safetensors_files = st.one_of(
    st.builds(
        _header_file,
        st.dictionaries(texts, tensor_entries, max_size=3),
        st.integers(0, 64),
        st.sampled_from([0, 0, -1, 3, 2**40]),
    ),
    st.builds(_header_file, json_values, st.integers(0, 8), st.just(0)),
    st.binary(max_size=40),
)


def _good_file(path) -> bytes:
    save_file(
        {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}, str(path)
    )
    return path.read_bytes()


@FUZZ
@given(content=safetensors_files, flip=st.none() | st.tuples(st.integers(0, 200), st.integers(1, 255)))
def test_any_safetensors_file_is_read_or_refused_naming_it(tmp_path_factory, content, flip):
    directory = tmp_path_factory.mktemp("hf")
    path = directory / SINGLE_SAFETENSORS
    if flip is not None:  # a real file with one byte changed
        content = bytearray(_good_file(path))
        position, mask = flip
        content[position % len(content)] ^= mask
    path.write_bytes(bytes(content))
    try:
        reader = SafetensorsReader(str(directory))
        headers = reader.headers()
        for name in reader.keys():
            assert len(reader.shape(name)) == reader.load([name])[name].dim() == len(headers[name][1])
    except WeightsError as error:
        assert str(error).startswith(str(path))


@FUZZ
@given(
    index=json_values
    | st.fixed_dictionaries(
        {"weight_map": st.dictionaries(texts, json_values | st.just(SINGLE_SAFETENSORS), max_size=3)}
    )
)
def test_any_shard_index_is_read_or_refused_naming_it(tmp_path_factory, index):
    directory = tmp_path_factory.mktemp("hf")
    _good_file(directory / SINGLE_SAFETENSORS)
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index))
    try:
        reader = SafetensorsReader(str(directory))
        for name in reader.keys():
            reader.shape(name)
    except WeightsError as error:
        assert str(directory / SAFETENSORS_INDEX) in str(error) or str(directory / SINGLE_SAFETENSORS) in str(error)


@pytest.mark.parametrize("base", [CONFIG, V2_CONFIG, QWEN3_MOE_CONFIG], ids=lambda config: config["model_type"])
@FUZZ
@given(changes=st.dictionaries(st.sampled_from(sorted({*CONFIG, *QWEN3_MOE_CONFIG, "rope_parameters"})),
                               json_values | numbers | st.just("delete"), max_size=3))  # fmt: skip
@example(changes={"hidden_size": "32"})
@example(changes={"rope_scaling": [4]})
@example(changes={"num_hidden_layers": 2.5})
def test_any_config_json_gives_model_flags_or_one_error_naming_it(tmp_path_factory, base, changes):
    directory = tmp_path_factory.mktemp("hf")
    config = {**base, **changes}
    config = {key: value for key, value in config.items() if value != "delete"}
    (directory / "config.json").write_text(json.dumps(config))
    try:
        args, argv, _ = read_hf_model_flags(str(directory))
    except (UnsupportedModelError, WeightsError) as error:
        assert str(error).startswith(str(directory / "config.json"))
        return
    layers = config.get("num_hidden_layers") or transformers_defaults(config["model_type"])["num_hidden_layers"]
    assert args.num_layers == layers and "--num-layers" in argv


@settings(max_examples=10, derandomize=True, deadline=None)
@given(content=st.binary(max_size=20) | st.builds(lambda value: json.dumps(value).encode(), json_values))
def test_a_config_json_that_is_no_json_object_is_named(tmp_path_factory, content):
    directory = tmp_path_factory.mktemp("hf")
    (directory / "config.json").write_bytes(content)
    try:
        read_hf_model_flags(str(directory))
    except (UnsupportedModelError, WeightsError) as error:
        assert str(error).startswith(str(directory / "config.json"))


def _saved_model_args() -> dict:
    defaults = vars(build_parser("").parse_args([]))
    return {**{name: defaults[name] for name in MODEL_SHAPE_ARGS + MODEL_FUNCTION_ARGS}, "transformer_impl": "local"}


@FUZZ
@given(
    changes=st.dictionaries(st.sampled_from(sorted(MODEL_SHAPE_ARGS)), json_values, max_size=2),
    wrap=st.sampled_from(["object", "list", "no model_args"]),
)
@example(changes={"num_layers": "2"}, wrap="object")
@example(changes={}, wrap="list")
def test_any_checkpoint_metadata_gives_model_flags_or_one_error_naming_it(tmp_path_factory, changes, wrap):
    directory = tmp_path_factory.mktemp("iter_0000001")
    model_args = {**_saved_model_args(), **changes}
    metadata = {
        "object": {
            "iteration": 1,
            "consumed_samples": 0,
            "skipped_iterations": 0,
            "nan_iterations": 0,
            "layout": {},
            "model_args": model_args,
        },  # fmt: skip
        "list": [model_args],
        "no model_args": {"iteration": 1},
    }[wrap]
    (directory / METADATA_FILE).write_text(json.dumps(metadata))
    try:
        args = checkpoint_args(str(directory))
    except CheckpointError as error:
        assert str(error).startswith(str(directory / METADATA_FILE))
        return
    assert wrap == "object"
    defaults = build_parser("").parse_args([])
    for name, value in changes.items():  # accepted only with the kind of value of the flag's default
        default = getattr(defaults, name)
        assert (
            value is None
            or default is None
            or type(value) is type(default)
            or isinstance(value, list)
            and not isinstance(default, (bool, str))
        )
        assert getattr(args, name) == json.loads(json.dumps(value))  # (a surrogate pair comes back as one character)
