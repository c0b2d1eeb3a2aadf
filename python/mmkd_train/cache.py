"""Teacher outputs computed once, stored on disk as safetensors, and reused.

The file ``DIR/teacher-cache.safetensors`` holds the teacher's token states of every distinct
English sentence of the training data, concatenated (``states``: (T, D), non-padding tokens only)
with ``offsets`` (n + 1,) marking each sentence's rows. Its metadata holds the key: digests of the
teacher's files, of its tokenizer, of the sentences, and the max length. A file whose key differs
(or that cannot be read) is rebuilt, never reused; the new file is written to a temporary name and
renamed, so a killed run leaves the previous cache or the new one, never a torn one.
"""

import hashlib
import json
import os

import torch

from .models import teacher_hidden

FILENAME = "teacher-cache.safetensors"


def _digest_files(directory: str) -> str:
    """SHA-256 over the names and contents of a model directory's config and weight files."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        if name == "config.json" or name.endswith((".safetensors", ".bin")):
            digest.update(name.encode())
            with open(os.path.join(directory, name), "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def _digest_tokenizer(tokenizer) -> str:
    """SHA-256 of what splits the sentences: the fast tokenizer's JSON without its truncation and
    padding entries, which the tokenizer rewrites on its first call with those options."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def cache_key(teacher_path: str, tokenizer, sources: list[str], max_length: int) -> dict:
    """What the cached states depend on: teacher, tokenizer, data, max length."""
    return {
        "teacher": _digest_files(teacher_path),
        "tokenizer": _digest_tokenizer(tokenizer),
        "data": hashlib.sha256("\n".join(sources).encode()).hexdigest(),
        "max_length": str(max_length),
    }


class TeacherCache:
    """states: (T, D) token states of all sentences; offsets: (n + 1,) int64 row boundaries."""

    def __init__(self, states: torch.Tensor, offsets: torch.Tensor):
        self.states, self.offsets = states, offsets
        self.lengths = offsets[1:] - offsets[:-1]

    def lookup(self, src_id: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) sentence indices, (B, L) the teacher tokenizer's mask -> (B, L, D) states, zero at padding."""
        src_id = src_id.cpu()
        mask = attention_mask.bool()
        if not torch.equal(self.lengths[src_id], mask.sum(1).cpu()):
            raise ValueError("teacher cache: token counts differ from the batch's; the cache is stale")
        rows = torch.cat([torch.arange(int(self.offsets[i]), int(self.offsets[i + 1])) for i in src_id.tolist()])
        out = self.states.new_zeros(*mask.shape, self.states.shape[1])
        out[mask.cpu()] = self.states[rows]
        return out.to(attention_mask.device)


@torch.no_grad()
def compute_states(teacher, tokenizer, sources: list[str], max_length: int, batch_size: int = 64) -> TeacherCache:
    """Run the teacher over ``sources`` (in order of length, for less padding), on the teacher's device,
    with a progress bar on the main process. The token counts come first (the tokenizer alone), so
    the states are written into one buffer of their final size: a list of per-sentence states
    concatenated at the end held the whole cache twice."""
    from tqdm.auto import tqdm

    counts = []  # in slices: a whole corpus's token ids at once are Python ints by the tens of millions
    for start in range(0, len(sources), 4096):
        encoded = tokenizer(sources[start : start + 4096], truncation=True, max_length=max_length)
        counts += [len(ids) for ids in encoded["input_ids"]]
    offsets = torch.cumsum(torch.tensor([0] + counts), 0)
    states = torch.empty(int(offsets[-1]), teacher.config.hidden_size)
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    device = next(teacher.parameters()).device
    starts = range(0, len(order), batch_size)
    for start in tqdm(starts, desc="teacher cache", unit="batch", disable=int(os.environ.get("RANK", "0")) != 0):
        chunk = order[start : start + batch_size]
        enc = tokenizer([sources[i] for i in chunk], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt").to(device)
        hidden = teacher_hidden(teacher, enc["input_ids"], enc["attention_mask"]).float().cpu()
        mask = enc["attention_mask"].bool().cpu()
        for row, i in enumerate(chunk):
            # A tokenizer that counted otherwise alone would misplace every later sentence: say so.
            if int(mask[row].sum()) != counts[i]:
                raise RuntimeError(f"teacher cache: sentence {i} has {int(mask[row].sum())} tokens in a batch and "
                                   f"{counts[i]} alone")
            states[int(offsets[i]):int(offsets[i + 1])] = hidden[row][mask[row]]
    return TeacherCache(states, offsets)


def load_or_build(directory: str, key: dict, build) -> tuple[TeacherCache, str]:
    """The cache of ``directory`` if its key is ``key``, else ``build()`` written there.

    Returns (cache, what happened: "reused" | "built" | "rebuilt (<why>)").
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open, save_file

    path = os.path.join(directory, FILENAME)
    why = "built"
    if os.path.isfile(path):
        try:
            with safe_open(path, framework="pt") as handle:
                stored = json.loads((handle.metadata() or {}).get("key", "{}"))
            if not isinstance(stored, dict):
                raise ValueError(f"its key is not a JSON object: {stored!r:.80}")
            if stored == key:
                tensors = load_file(path)
                return TeacherCache(tensors["states"], tensors["offsets"]), "reused"
            changed = sorted(k for k in key if stored.get(k) != key[k])
            why = f"rebuilt ({', '.join(changed)} changed)"
        except (SafetensorError, OSError, ValueError, KeyError) as error:
            why = f"rebuilt (unreadable: {error})"
    cache = build()
    os.makedirs(directory, exist_ok=True)
    staging = f"{path}.tmp-{os.getpid()}"
    try:
        save_file({"states": cache.states, "offsets": cache.offsets}, staging, metadata={"key": json.dumps(key)})
        os.replace(staging, path)
    finally:  # a failed write (a full disk) leaves no staging file of the cache's size behind
        if os.path.exists(staging):
            os.unlink(staging)
    return cache, why
