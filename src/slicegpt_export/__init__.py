"""slicegpt-export: SliceGPT compression of Hugging Face models, exported for ONNX Runtime and GGUF toolchains."""

from slicegpt_export.checkpoint import SlicedConfig, load_sliced
from slicegpt_export.errors import SliceGPTError
from slicegpt_export.modeling import SlicedModel

__version__ = "0.1.0"
__all__ = ["SliceGPTError", "SlicedConfig", "SlicedModel", "__version__", "load_sliced"]
