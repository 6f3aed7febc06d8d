"""Markdown table from benches/side_by_side.sh's output folder: each slm-chat figure against
llama.cpp's best configuration for it, with the ratio."""
import json
import re
import sys
from pathlib import Path

out = Path(sys.argv[1])
slm = json.loads((out / "slm.json").read_text())
llama = {fa: json.loads((out / f"llama-fa{fa}.json").read_text()) for fa in (1, 0)}


def peak_rss_mib(path):
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", path.read_text())
    return int(m.group(1)) / 1024 if m else float("nan")


ours = {f["name"]: f for f in slm["figures"]}
rows = []
for n in [k for k in ("512", "2048", "8000") if k in llama[1]["prefill"]]:
    best_fa = max(llama, key=lambda fa: llama[fa]["prefill"][n]["median_wall_tok_s"])
    rows.append((f"prefill {n}", ours[f"prefill-{n}"]["median_tok_s"],
                 llama[best_fa]["prefill"][n]["median_wall_tok_s"], best_fa))
best_fa = max(llama, key=lambda fa: llama[fa]["decode"]["median_wall_tok_s"])
rows.append(("decode after 512", ours["decode-after-512"]["median_tok_s"],
             llama[best_fa]["decode"]["median_wall_tok_s"], best_fa))

print(f"model: {slm['model']}\n")
print(f"threads: slm-chat {slm['threads']}, llama.cpp {llama[1]['threads']}\n")
print("| figure (tok/s, median) | slm-chat | llama.cpp (best config) | ratio |")
print("|---|---|---|---|")
for name, a, b, fa in rows:
    print(f"| {name} | {a:.1f} | {b:.1f} (flash_attn={'on' if fa else 'off'}) | **{a / b:.2f}×** |")
enc = [f for f in slm["figures"] if f["name"].startswith("encode")][0]
print(f"| {enc['name']} (no output head) | {enc['median_tok_s']:.1f} | – | – |")
print()
print(f"peak RSS (/usr/bin/time): slm-chat {peak_rss_mib(out / 'slm.time'):.0f} MiB, "
      f"llama.cpp fa=on {peak_rss_mib(out / 'llama-fa1.time'):.0f} MiB, "
      f"fa=off {peak_rss_mib(out / 'llama-fa0.time'):.0f} MiB")
