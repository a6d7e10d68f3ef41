"""Sizing probe for the 20 Newsgroups recipes: token lengths, and seconds per train step / eval batch."""
import json, time, statistics, torch, transformers
from dynprune.assets import minilm_path
from dynprune.train.config import DataConfig
from dynprune.train.data import load_task_data
torch.set_num_threads(2)
transformers.logging.set_verbosity_error()
data = load_task_data(DataConfig(dataset="news20"))
tok = transformers.AutoTokenizer.from_pretrained(minilm_path())
out = {"sizes": data.sizes()}
lens = sorted(len(x) for x in tok(list(data.splits["train"]["text"]), truncation=False)["input_ids"])
n = len(lens)
out["tokens"] = {f"p{q}": lens[min(n - 1, int(q / 100 * n))] for q in (5, 25, 50, 75, 95, 99)}
out["truncated_frac"] = {L: sum(l > L for l in lens) / n for L in (128, 256, 512)}
out["mean_len_after_trunc"] = {L: sum(min(l, L) for l in lens) / n for L in (128, 256)}
model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=20)
opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
texts = list(data.splits["train"]["text"])[:64]
labels = torch.tensor(list(data.splits["train"]["label"])[:64])
for L in (128, 256):
    enc = tok(texts, truncation=True, max_length=L, padding="longest", return_tensors="pt")
    model.train(); ts = []
    for i in range(7):
        s = slice((i % 4) * 16, (i % 4) * 16 + 16)
        t0 = time.perf_counter()
        loss = model(input_ids=enc["input_ids"][s], attention_mask=enc["attention_mask"][s], labels=labels[s]).loss
        loss.backward(); opt.step(); opt.zero_grad()
        ts.append(time.perf_counter() - t0)
    model.eval(); es = []
    with torch.no_grad():
        for i in range(4):
            t0 = time.perf_counter(); model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]); es.append(time.perf_counter() - t0)
    out[f"L{L}"] = {"padded": enc["input_ids"].shape[1], "train_step_bs16_s": statistics.median(ts[2:]),
                    "eval_bs64_s": statistics.median(es[1:])}
print(json.dumps(out, indent=1))
