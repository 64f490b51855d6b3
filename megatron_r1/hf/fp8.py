"""DeepSeek's FP8 block format, as published with DeepSeek-V3 / R1 (their README_WEIGHTS.md):

- ``config.json`` carries ``quantization_config`` = ``{"quant_method": "fp8", "fmt": "e4m3",
  "weight_block_size": [128, 128], "activation_scheme": "dynamic"}``;
- each quantized Linear weight ``<module>.weight`` is stored as ``float8_e4m3fn`` next to a float32
  ``<module>.weight_scale_inv`` holding one scale per 128x128 block (a ceil-div grid: the blocks at the
  right and bottom edges are partial); a block dequantizes as ``weight.float() * scale_inv``;
- the attention projections and every MLP / expert / shared-expert projection are quantized; the
  embeddings, norms, the router (``mlp.gate``) and its bias, MTP's ``eh_proj`` and the output heads
  are not.

Quantizing a block scales it so that its largest magnitude becomes float8_e4m3fn's largest finite
value (448): ``scale_inv = amax / 448`` (computed as if partial blocks were zero-padded).
"""

import math
import re

import torch

from megatron_r1.hf.storage import WeightsError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max
SAFETENSORS_FP8 = "F8_E4M3"  # float8_e4m3fn's dtype name in a safetensors header
SCALE_SUFFIX = "_scale_inv"
DEEPSEEK_BLOCK = (128, 128)

# The Hugging Face names of the weights DeepSeek quantizes (MLA's projections, dense, routed and
# shared experts' gate/up/down); ``mlp.gate.weight`` (the router) and ``eh_proj`` stay unquantized.
_QUANTIZED_WEIGHT = re.compile(
    r"\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$"
)


def deepseek_quantizes(name: str) -> bool:
    """Whether DeepSeek's FP8 release stores Hugging Face tensor `name` in float8 with a scale."""
    return _QUANTIZED_WEIGHT.search(name) is not None


def fp8_quantization_config(block: tuple[int, int] = DEEPSEEK_BLOCK) -> dict:
    """The ``quantization_config`` entry of config.json for weights quantized in `block` blocks."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": list(block)}


def scale_grid(shape, block: tuple[int, int]) -> tuple[int, int]:
    """The shape of the scale tensor of a 2-D weight of `shape`: one entry per (possibly partial) block."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def _per_element(scale_inv: torch.Tensor, shape, block: tuple[int, int]) -> torch.Tensor:
    """Each block's scale repeated over the block, cut to `shape` (the edge blocks are partial)."""
    expanded = scale_inv.repeat_interleave(block[0], dim=0).repeat_interleave(block[1], dim=1)
    return expanded[: shape[0], : shape[1]]


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """float32 weights of a float8 `weight` and its per-block `scale_inv`."""
    return weight.float() * _per_element(scale_inv.float(), weight.shape, block)


def quantize(weight: torch.Tensor, block: tuple[int, int] = DEEPSEEK_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``(float8_e4m3fn weight, float32 scale_inv)`` of a 2-D `weight`, one scale per block."""
    weight = weight.float()
    rows, cols = scale_grid(weight.shape, block)
    padded = torch.nn.functional.pad(
        weight.abs(), (0, cols * block[1] - weight.shape[1], 0, rows * block[0] - weight.shape[0])
    )
    amax = padded.view(rows, block[0], cols, block[1]).amax(dim=(1, 3))
    # An all-zero block gets the smallest normal scale instead of 0 (0/0), and stays zeros.
    scale_inv = (amax / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    scaled = weight / _per_element(scale_inv, weight.shape, block)
    return scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale_inv


class RoundTripError:
    """How far the dequantized float8 weights are from the weights quantized, over all tensors added."""

    def __init__(self):
        self.tensors, self.max_abs, self._error_squares, self._squares = 0, 0.0, 0.0, 0.0

    def add(self, weight: torch.Tensor, dequantized: torch.Tensor) -> None:
        error = (dequantized - weight.float()).double()
        self.tensors += 1
        self.max_abs = max(self.max_abs, error.abs().max().item() if error.numel() else 0.0)
        self._error_squares += error.square().sum().item()
        self._squares += weight.double().square().sum().item()

    def summary(self, block: tuple[int, int]) -> dict:
        relative = math.sqrt(self._error_squares / self._squares) if self._squares else 0.0
        return {
            "tensors": self.tensors,
            "weight_block_size": list(block),
            "max_abs_error": self.max_abs,
            "relative_rms_error": relative,
        }


def _fp8_errors(headers: dict, block: tuple[int, int] | None) -> list[str]:
    """What is wrong with the float8 weights and scales of `headers` ({name: (dtype, shape)})."""
    scales = {name[: -len(SCALE_SUFFIX)]: name for name in headers if name.endswith(SCALE_SUFFIX)}
    fp8 = [name for name, (dtype, _) in headers.items() if dtype.startswith("F8_")]
    if block is None:
        found = (fp8 + list(scales.values()))[:3]
        return (
            [f"{', '.join(found)} are float8 weights or their scales, but config.json has no quantization_config"]
            if found
            else []
        )
    errors = [
        f"{scale} scales {weight}, which the weights lack" for weight, scale in scales.items() if weight not in headers
    ]
    for name in fp8:
        dtype, shape = headers[name]
        if dtype != SAFETENSORS_FP8:
            errors.append(f"{name} is {dtype}; quantization_config fmt e4m3 means {SAFETENSORS_FP8} (float8_e4m3fn)")
        elif name not in scales:
            errors.append(f"{name} is float8 but has no {name}{SCALE_SUFFIX}")
        elif len(shape) != 2:
            errors.append(f"{name} is float8 of shape {shape}; only 2-D weights are block-quantized")
    for weight, scale in scales.items():
        if weight not in headers:
            continue
        (weight_dtype, shape), (scale_dtype, scale_shape) = headers[weight], headers[scale]
        if weight_dtype != SAFETENSORS_FP8:
            errors.append(f"{scale} scales {weight}, which is {weight_dtype}, not float8")
        elif scale_dtype != "F32":
            errors.append(f"{scale} is {scale_dtype}; DeepSeek's scales are F32")
        elif len(shape) == 2 and scale_shape != scale_grid(shape, block):
            errors.append(
                f"{scale} has shape {scale_shape}, but {weight} {shape} in {block[0]}x{block[1]} blocks "
                f"(weight_block_size) needs {scale_grid(shape, block)}"
            )
    return errors


class DequantizingReader:
    """The tensors of a Hugging Face directory (a SafetensorsReader) with DeepSeek's FP8 weights
    dequantized to float32 one tensor at a time as they are loaded; the ``_scale_inv`` tensors are
    consumed, not listed. Every float8 weight and scale is checked against `block` (the
    quantization_config's weight_block_size, None when there is none) on construction."""

    def __init__(self, reader, block: tuple[int, int] | None):
        headers = reader.headers()
        errors = _fp8_errors(headers, block)
        if errors:
            raise WeightsError(
                f"{reader.directory}: "
                + "; ".join(errors[:4])
                + (f" and {len(errors) - 4} more" if len(errors) > 4 else "")
            )
        self.reader, self.block, self.directory = reader, block, reader.directory
        self.scales = {name: name + SCALE_SUFFIX for name, (dtype, _) in headers.items() if dtype == SAFETENSORS_FP8}
        scale_names = set(self.scales.values())
        self._shapes = {name: shape for name, (_, shape) in headers.items() if name not in scale_names}

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, name: str) -> tuple:
        return self._shapes[name]

    def load(self, names) -> dict:
        names = list(names)
        tensors = self.reader.load(names + [self.scales[name] for name in names if name in self.scales])
        for name in names:
            if name in self.scales:
                tensors[name] = dequantize(tensors[name], tensors.pop(self.scales[name]), self.block)
        return tensors
