"""The demo's language model and data (python -m fastkd demo, docs/demo.md): the corpus (the Python
standard library's own sources), its byte-level BPE tokenizer, the tiny causal Transformer used as
teacher and student, its evaluation, and the cache teacher callable of step 4."""
import glob
import os
import random
import sysconfig

import torch
import torch.nn.functional as F



class TinyLM(torch.nn.Module):
    """A pre-norm decoder-only transformer: ids [B, L] -> hidden [B, L, d]; `head` is the LM head."""

    def __init__(self, vocab, d, layers, heads, seq_len):
        super().__init__()
        self.tok = torch.nn.Embedding(vocab, d)
        self.pos = torch.nn.Embedding(seq_len, d)
        layer = torch.nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.config = dict(vocab=vocab, d=d, layers=layers, heads=heads, seq_len=seq_len)

    def hidden(self, ids):
        n = ids.shape[1]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(n, device=ids.device)
        x = self.tok(ids) + self.pos(torch.arange(n, device=ids.device))
        return self.norm(self.blocks(x, mask=mask, is_causal=True))

    def forward(self, ids):
        return self.head(self.hidden(ids))


def corpus(seed, max_files=None):
    """(train files, validation files) of the standard library's .py sources, split 9:1 by file."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(f for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
                   if "site-packages" not in f and os.sep + "test" not in f[len(root):])
    random.Random(seed).shuffle(files)
    files = files[:max_files] if max_files else files
    n_val = max(1, len(files) // 10)
    return files[n_val:], files[:n_val]


def read(path):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def train_tokenizer(files, vocab):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator((read(f) for f in files), trainer)
    return tok


def encode(tok, files):
    return torch.tensor([i for enc in tok.encode_batch([read(f) for f in files]) for i in enc.ids], dtype=torch.long)


def batches(tokens, seq_len, batch_size, seed):
    """An endless, seeded stream of [B, L + 1] windows (the same order for every student)."""
    g = torch.Generator().manual_seed(seed)
    n = tokens.numel() - seq_len - 1
    while True:
        starts = torch.randint(0, n, (batch_size,), generator=g)
        yield torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, val, seq_len, teacher=None, max_windows=48):
    """(mean CE in nats, ECE over 15 bins of next-token top-1, agreement with the teacher's top-1)."""
    model.eval()
    n = min(max_windows, (val.numel() - 1) // seq_len)
    windows = val[:n * seq_len + 1]
    ids = windows[:-1].view(n, seq_len)
    target = windows[1:].view(n, seq_len)
    logits = model(ids).float()
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).item()
    conf, pred = logits.softmax(-1).max(-1)
    correct = (pred == target).float().reshape(-1)
    conf = conf.reshape(-1)
    bins = torch.clamp((conf * 15).long(), max=14)
    ece = sum((bins == b).float().sum() / conf.numel() * (correct[bins == b].mean() - conf[bins == b].mean()).abs()
              for b in range(15) if (bins == b).any()).item()
    agree = float("nan") if teacher is None else (teacher(ids).argmax(-1) == pred).float().mean().item()
    model.train()
    return ce, ece, agree


_TEACHER = None


def cache_teacher(ids):
    """The `--teacher fastkd.cli.demo_lm:cache_teacher` callable of step 4: ids [B, L] -> logits."""
    global _TEACHER
    if _TEACHER is None:
        state = torch.load(os.environ["FASTKD_DEMO_TEACHER"], weights_only=True)
        _TEACHER = TinyLM(**state["config"]).eval()
        _TEACHER.load_state_dict(state["weights"])
    with torch.no_grad():
        return _TEACHER(ids)
