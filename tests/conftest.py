import os
import warnings

# Tests run on CPU: DeepSpeed must not look for CUDA, and the gloo backend does the collectives.
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex).*")
