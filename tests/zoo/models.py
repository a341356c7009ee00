"""The model zoo: LightningModules written the way users write them, at tiny widths, random
weights, nothing downloaded. Every technique's zoo tests (``tests/zoo/test_<technique>.py``)
build their cells from here.

The API is ``ZOO`` (name -> :class:`ZooModel`) and :func:`build`:

>>> built = build("user_resnet")
>>> built.task, type(built.module).__name__, sorted(next(iter(built.data.train_dataloader())))
('classification', 'UserResNet', ['image', 'label'])

``build(name)`` returns a :class:`Built`: ``module`` (the LightningModule), ``data`` (a
LightningDataModule with a fixed split) and ``task``: ``"classification"`` (the module logs
``val/loss`` and ``val/acc``) or ``"lm"`` (``val/loss`` only, mean token cross-entropy).
``ZooModel.requires`` names the packages an entry imports; :func:`available` says whether they
import here, so a test can parametrize over ``ZOO`` and skip only what cannot be installed.

Data:

- images: scikit-learn's bundled 8x8 digits, upsampled to 3x32x32, fixed 80/20 split;
- text: a byte corpus made of a fixed list of the Python standard library's own source files
  (``os.path.dirname(os.__file__)``), printable ASCII mapped to 96 symbols, split by position
  (first 90% train, last 10% validation), in windows of ``seq_len`` bytes. Its contents follow
  the Python version; it is the same on every run of one interpreter.

torchvision cannot be used beside the CPU build of torch 2.13 (PyPI's wheels link
``libc10_cuda.so``), and timm imports torchvision: ``resnet18`` is Hugging Face's ResNet with
ResNet-18's layout (basic blocks, depths 2-2-2-2), ``vit_tiny`` Hugging Face's ViT with
ViT-Tiny's 3 heads, and ``mobilenet_v3_small`` a faithful copy of torchvision's
``mobilenet_v3_small`` (inverted residuals, squeeze-excitation, hardswish) at a width multiplier.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

TASKS = ("classification", "lm")
VOCAB = 96  # printable ASCII (32..126) plus newline
STDLIB_FILES = ("textwrap.py", "string.py", "heapq.py", "bisect.py", "shlex.py", "fnmatch.py", "colorsys.py", "glob.py")


# --- data ------------------------------------------------------------------------------------------
@cache
def stdlib_corpus(files: tuple[str, ...] = STDLIB_FILES) -> torch.Tensor:
    """The bytes of ``files`` from the standard library's directory, as symbols 0..95 (long)."""
    root = Path(os.path.dirname(os.__file__))
    text = b"\n".join((root / f).read_bytes() for f in files)
    b = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    return torch.where(b == 10, torch.full_like(b, 95), (b - 32).clamp(0, 94))


class _DictDataset(Dataset):
    def __init__(self, **tensors: torch.Tensor):
        self.tensors = tensors

    def __len__(self):
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


class ZooData(pl.LightningDataModule):
    """A fixed train/validation split held in memory (``train``/``val`` are Datasets)."""

    def __init__(self, train: Dataset, val: Dataset, batch_size: int = 32, seed: int = 0):
        super().__init__()
        self.train, self.val, self.batch_size, self.seed = train, val, batch_size, seed

    def train_dataloader(self):
        return DataLoader(
            self.train, batch_size=self.batch_size, shuffle=True, generator=torch.Generator().manual_seed(self.seed)
        )

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=64)


def text_windows(seq_len: int = 32, stride: int | None = None, split: str = "train") -> torch.Tensor:
    data = stdlib_corpus()
    cut = int(0.9 * len(data))
    data = data[:cut] if split == "train" else data[cut:]
    stride = stride or seq_len
    n = (len(data) - seq_len - 1) // stride
    return torch.stack([data[i * stride : i * stride + seq_len + 1] for i in range(n)])


def lm_data(style: str = "dict", seq_len: int = 32, train_windows: int = 256, batch_size: int = 16) -> ZooData:
    """Next-byte prediction windows. ``style="dict"``: Hugging Face batches ``{input_ids,
    attention_mask, labels}`` (labels = input_ids; the model shifts); ``"tuple"``: ``(x, y)`` with y
    shifted by one."""
    parts = []
    for split, n in (("train", train_windows), ("val", 64)):
        w = text_windows(seq_len, split=split)[:n]
        if style == "dict":
            ids = w[:, :-1].contiguous()
            parts.append(_DictDataset(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone()))
        else:
            parts.append(TensorDataset(w[:, :-1].contiguous(), w[:, 1:].contiguous()))
    return ZooData(*parts, batch_size=batch_size)


def snippet_classes(seq_len: int = 32, per_class: int = 96, batch_size: int = 16) -> ZooData:
    """Which of 4 standard-library files a padded snippet comes from (BERT-style dict batches
    with an ``attention_mask`` that marks padding)."""
    g = torch.Generator().manual_seed(0)
    sets = {"train": [], "val": []}
    for label, name in enumerate(STDLIB_FILES[:4]):
        data = stdlib_corpus((name,))
        n = (len(data) - seq_len) // seq_len
        order = torch.randperm(n, generator=g)[: per_class + 24]
        for split, idx in (("train", order[:per_class]), ("val", order[per_class:])):
            for i in idx.tolist():
                sets[split].append((data[i * seq_len : (i + 1) * seq_len], label))
    out = []
    for split in ("train", "val"):
        ids = torch.stack([s for s, _ in sets[split]])
        length = torch.randint(seq_len // 2, seq_len + 1, (len(ids),), generator=g)
        mask = (torch.arange(seq_len)[None] < length[:, None]).long()
        out.append(
            _DictDataset(input_ids=ids * mask, attention_mask=mask, labels=torch.tensor([y for _, y in sets[split]]))
        )
    return ZooData(*out, batch_size=batch_size)


def digit_images(style: str = "tuple", size: int = 32, batch_size: int = 32, train: int = 512) -> ZooData:
    """scikit-learn's digits as 3-channel ``size`` x ``size`` images, fixed 80/20 split.
    ``style``: ``"tuple"`` (x, y), ``"dict"`` {image, label}, ``"hf"`` {pixel_values, labels}."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="nearest").repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    cut = int(0.8 * len(y))
    splits = [(x[perm[:cut]][:train], y[perm[:cut]][:train]), (x[perm[cut:]], y[perm[cut:]])]
    keys = {"dict": ("image", "label"), "hf": ("pixel_values", "labels")}.get(style)
    made = [TensorDataset(a, b) if keys is None else _DictDataset(**{keys[0]: a, keys[1]: b}) for a, b in splits]
    return ZooData(*made, batch_size=batch_size)


# --- LightningModules as users write them -----------------------------------------------------------
class _Classifier(pl.LightningModule):
    """Logs ``val/loss`` and ``val/acc``; subclasses say how a batch becomes (logits, labels)."""

    def logits_and_labels(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        logits, y = self.logits_and_labels(batch)
        loss = F.cross_entropy(logits, y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        logits, y = self.logits_and_labels(batch)
        self.log("val/loss", F.cross_entropy(logits, y))
        self.log("val/acc", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class VisionClassifier(_Classifier):
    """``self.net(x)`` on ``(x, y)`` batches (the torchvision-style models)."""

    def __init__(self, net: nn.Module, lr: float = 2e-3):
        super().__init__()
        self.net, self.lr = net, lr
        self.example_input_array = torch.zeros(2, 3, 32, 32)

    def forward(self, x):
        return self.net(x)

    def logits_and_labels(self, batch):
        return self(batch[0]), batch[1]


class HFImageClassifier(_Classifier):
    """``self.model(pixel_values=..., labels=...)`` on ``{pixel_values, labels}`` batches."""

    def __init__(self, model: nn.Module, lr: float = 2e-3):
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        return self.model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss

    def logits_and_labels(self, batch):
        return self.model(pixel_values=batch["pixel_values"]).logits, batch["labels"]


class HFSequenceClassifier(HFImageClassifier):
    """``self.model(input_ids=..., attention_mask=..., labels=...).loss`` (BERT)."""

    def training_step(self, batch, batch_idx):
        return self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss

    def logits_and_labels(self, batch):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits, batch["labels"]


class HFCausalLM(pl.LightningModule):
    """``self.model(input_ids=..., attention_mask=..., labels=...).loss`` on dict batches (Llama, GPT-2)."""

    def __init__(self, model: nn.Module, lr: float = 3e-3):
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        loss = self.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
        ).loss
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        self.log("val/loss", out.loss)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


class CharTransformerLM(pl.LightningModule):
    """A ``nn.TransformerEncoder`` character LM with a causal mask, on ``(x, y)`` batches."""

    def __init__(
        self, vocab: int = VOCAB, dim: int = 32, heads: int = 4, layers: int = 2, seq_len: int = 32, lr: float = 3e-3
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, seq_len, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, vocab)
        self.lr = lr
        self.example_input_array = torch.zeros(1, seq_len, dtype=torch.long)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], device=x.device)
        return self.head(self.encoder(self.embed(x) + self.pos[:, : x.shape[1]], mask=mask, is_causal=True))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x).flatten(0, 1), y.flatten())
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x).flatten(0, 1), y.flatten()))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class UserResNet(_Classifier):
    """A user's BN ResNet: dict batches ``{image, label}``, SGD + Nesterov, OneCycleLR stepped per batch."""

    def __init__(self, width: int = 8, lr: float = 0.1, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.layer1 = _BasicBlock(width, width, 1)
        self.layer2 = _BasicBlock(width, 2 * width, 2)
        self.layer3 = _BasicBlock(2 * width, 4 * width, 2)
        self.fc = nn.Linear(4 * width, num_classes)
        self.lr = lr
        self.example_input_array = torch.zeros(2, 3, 32, 32)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))

    def logits_and_labels(self, batch):
        return self(batch["image"]), batch["label"]

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.lr, total_steps=max(2, int(self.trainer.estimated_stepping_batches))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _divisible(v: float, d: int = 8) -> int:
    new = max(d, int(v + d / 2) // d * d)
    return new + d if new < 0.9 * v else new


class _SqueezeExcitation(nn.Module):
    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(channels, squeeze, 1), nn.Conv2d(squeeze, channels, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))


class _InvertedResidual(nn.Module):
    def __init__(self, cin, kernel, expanded, cout, use_se, activation, stride):
        super().__init__()
        act = nn.Hardswish if activation == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers += [nn.Conv2d(cin, expanded, 1, bias=False), nn.BatchNorm2d(expanded), act()]
        layers += [
            nn.Conv2d(expanded, expanded, kernel, stride, (kernel - 1) // 2, groups=expanded, bias=False),
            nn.BatchNorm2d(expanded),
            act(),
        ]
        if use_se:
            layers.append(_SqueezeExcitation(expanded, _divisible(expanded // 4)))
        layers += [nn.Conv2d(expanded, cout, 1, bias=False), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        out = self.block(x)
        return out + x if self.residual else out


class MobileNetV3Small(nn.Module):
    """torchvision's ``mobilenet_v3_small`` layout (its inverted-residual table), ``width_mult`` scaled."""

    SETTING: ClassVar[list[tuple]] = [
        (16, 3, 16, 16, True, "RE", 2),
        (16, 3, 72, 24, False, "RE", 2),
        (24, 3, 88, 24, False, "RE", 1),
        (24, 5, 96, 40, True, "HS", 2),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 240, 40, True, "HS", 1),
        (40, 5, 120, 48, True, "HS", 1),
        (48, 5, 144, 48, True, "HS", 1),
        (48, 5, 288, 96, True, "HS", 2),
        (96, 5, 576, 96, True, "HS", 1),
        (96, 5, 576, 96, True, "HS", 1),
    ]

    def __init__(self, num_classes: int = 10, width_mult: float = 0.25, last_channel: int = 128):
        super().__init__()
        w = lambda c: _divisible(c * width_mult)
        first = w(16)
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(3, first, 3, 2, 1, bias=False), nn.BatchNorm2d(first), nn.Hardswish())
        ]
        for cin, k, exp, cout, se, act, stride in self.SETTING:
            layers.append(_InvertedResidual(w(cin), k, w(exp), w(cout), se, act, stride))
        last_conv = 6 * w(96)
        layers.append(
            nn.Sequential(nn.Conv2d(w(96), last_conv, 1, bias=False), nn.BatchNorm2d(last_conv), nn.Hardswish())
        )
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, last_channel), nn.Hardswish(), nn.Dropout(0.2), nn.Linear(last_channel, num_classes)
        )

    def forward(self, x):
        return self.classifier(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


# --- the registry ---------------------------------------------------------------------------------
@dataclass
class Built:
    module: pl.LightningModule
    data: pl.LightningDataModule
    task: str


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: ``make()`` builds ``(module, data)`` for ``task``; ``requires`` names the
    packages it imports; ``family`` groups entries (``"cnn"``, ``"vision-transformer"``,
    ``"torch-transformer"``, ``"hf-decoder"``, ``"hf-encoder"``, ``"linear"``)."""

    name: str
    task: str
    family: str
    make: Callable[[], tuple[pl.LightningModule, pl.LightningDataModule]]
    requires: tuple[str, ...] = ()
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        use_cache=False,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
    )
    return HFCausalLM(LlamaForCausalLM(cfg)), lm_data("dict")


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        use_cache=False,
        bos_token_id=None,
        eos_token_id=None,
        loss_type="ForCausalLM",
    )
    return HFCausalLM(GPT2LMHeadModel(cfg)), lm_data("dict")


def _bert():
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=4,
        pad_token_id=0,
    )
    return HFSequenceClassifier(BertForSequenceClassification(cfg)), snippet_classes()


def _vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=3,
        intermediate_size=96,
        num_labels=10,
    )
    return HFImageClassifier(ViTForImageClassification(cfg)), digit_images("hf")


def _resnet18():
    from transformers import ResNetConfig, ResNetForImageClassification

    cfg = ResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[8, 16, 32, 64], embedding_size=8, num_labels=10
    )
    return HFImageClassifier(ResNetForImageClassification(cfg)), digit_images("hf")


def _boring():
    from lightning.pytorch.demos.boring_classes import BoringDataModule, BoringModel

    return BoringModel(), BoringDataModule()


ZOO: dict[str, ZooModel] = {
    z.name: z
    for z in [
        ZooModel(
            "resnet18",
            "classification",
            "cnn",
            _resnet18,
            ("transformers",),
            "Hugging Face ResNet with ResNet-18's basic blocks (2-2-2-2), widths 8-64",
        ),
        ZooModel(
            "mobilenet_v3_small",
            "classification",
            "cnn",
            lambda: (VisionClassifier(MobileNetV3Small()), digit_images("tuple")),
            (),
            "torchvision's mobilenet_v3_small layout at width 0.25 (SE, hardswish, depthwise convs)",
        ),
        ZooModel(
            "user_resnet",
            "classification",
            "cnn",
            lambda: (UserResNet(), digit_images("dict")),
            (),
            "BN ResNet, dict batches, SGD + Nesterov, OneCycleLR per step",
        ),
        ZooModel(
            "vit_tiny",
            "classification",
            "vision-transformer",
            _vit,
            ("transformers",),
            "Hugging Face ViT, ViT-Tiny's 3 heads at width 48, 2 layers",
        ),
        ZooModel(
            "char_transformer",
            "lm",
            "torch-transformer",
            lambda: (CharTransformerLM(), lm_data("tuple")),
            (),
            "nn.TransformerEncoder causal character LM (nn.MultiheadAttention: in_proj_weight)",
        ),
        ZooModel("llama", "lm", "hf-decoder", _llama, ("transformers",), "LlamaForCausalLM, 2 layers, width 32"),
        ZooModel("gpt2", "lm", "hf-decoder", _gpt2, ("transformers",), "GPT2LMHeadModel (Conv1D layers)"),
        ZooModel(
            "bert",
            "classification",
            "hf-encoder",
            _bert,
            ("transformers",),
            "BertForSequenceClassification on padded snippets (attention_mask)",
        ),
        ZooModel("boring", "classification", "linear", _boring, (), "Lightning's BoringModel (no val/acc, MSE loss)"),
    ]
}


def available(name: str) -> bool:
    """Whether every package ``ZOO[name]`` needs imports here."""
    try:
        for module in ZOO[name].requires:
            importlib.import_module(module)
    except ImportError:
        return False
    return True


def build(name: str, seed: int = 0) -> Built:
    """``ZOO[name]`` built with ``seed`` (random weights)."""
    entry = ZOO[name]
    pl.seed_everything(seed, verbose=False)
    module, data = entry.make()
    return Built(module, data, entry.task)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
