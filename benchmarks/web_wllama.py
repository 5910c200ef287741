"""Another engine for the page's WASM fallback: llama.cpp compiled to WASM (SIMD + threads), as the npm package
@wllama/wllama ships it, against native ONNX Runtime on the web bundle's int4 graph (issue 29).

The question is a design one: does llama.cpp's WASM decode clear the 0.25x-native target that onnxruntime-web's
WASM (f32 weights, benchmarks/web_page.py) does not? In alternating rounds on the same machine:

  wllama_<quant>  the model's GGUF (the test cache's llama.cpp references: Q4_0, Q8_0) decoded in headless
                  Chromium through wllama, cross-origin isolated, n_threads T, greedy, EOS ignored; tokens/s as
                  the page sees them stream (first token to last) and as llama.cpp times them (timings)
  native          ONNX Runtime (Python, CPU EP) on the web bundle's model.onnx (int4), intra_op threads T, as
                  benchmarks/web_page.py drives it

    python benchmarks/web_wllama.py --models smollm2 tiny-qwen2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))

import models  # noqa: E402
import web_support as ws  # noqa: E402
from web_page import MESSAGE, native_tps, web_bundle  # noqa: E402

WLLAMA_VERSION = "3.13.0"
WLLAMA_FILES = {"package/esm/index.js": "index.js", "package/esm/wasm/wllama.wasm": "wllama.wasm"}
# The llama.cpp reference GGUFs tests/models.py builds from the same checkpoints as the web bundles.
GGUF_SOURCE = {"smollm2": "ref-smollm2-hf", "tiny-qwen2": "ref-tiny-qwen2"}
PAGE = b"""<!doctype html><meta charset="utf-8"><title>wllama bench</title>
<script type="module">
import { Wllama } from '/_wllama/index.js';
window.bench = async (gguf, prompt, nGen, threads) => {
  const w = new Wllama({ default: '/_wllama/wllama.wasm' }, { suppressNativeLog: true,
    logger: { debug() {}, log() {}, warn: console.warn, error: console.error } });
  const blob = await (await fetch(gguf)).blob();
  const t0 = performance.now();
  await w.loadModel([blob], { n_threads: threads, n_gpu_layers: 0, n_ctx: 512, n_parallel: 1 });
  const loadMs = performance.now() - t0;
  const stamps = [];
  let timings = null, text = '';
  await w.createCompletion({ prompt, max_tokens: nGen, temperature: 0, ignore_eos: true, cache_prompt: false,
    stream: true, onData: (c) => { stamps.push(performance.now()); text += c.choices?.[0]?.text ?? '';
                                   if (c.timings) timings = c.timings; } });
  await w.exit();
  return { loadMs, stamps, timings, text, multiThread: self.crossOriginIsolated };
};
window.benchReady = true;
</script>"""


def wllama_dist() -> Path:
    """wllama's ES module and WASM build, fetched with npm once per machine (as web_support fetches ORT Web)."""
    def build(tmp: Path) -> None:
        subprocess.run([shutil.which("npm") or "npm", "pack", f"@wllama/wllama@{WLLAMA_VERSION}",
                        "--pack-destination", str(tmp), "--silent"], check=True, capture_output=True, timeout=600)
        (tgz,) = tmp.glob("wllama-wllama-*.tgz")
        with tarfile.open(tgz) as tar:
            for m in tar.getmembers():
                if m.name in WLLAMA_FILES:
                    (tmp / WLLAMA_FILES[m.name]).write_bytes(tar.extractfile(m).read())
        tgz.unlink()

    return models._atomic_build(models.CACHE / f"wllama-{WLLAMA_VERSION}", build)


def gguf_path(name: str, quant: str) -> Path:
    hits = sorted(models.CACHE.glob(f"refq-{GGUF_SOURCE[name]}-*-{quant}-*/model.gguf"))
    if not hits:
        raise FileNotFoundError(f"no {quant} GGUF of {name} in {models.CACHE}: run tests/test_gguf_quality.py once")
    return hits[-1]


def wllama_run(browser, url: str, prompt: str, n_gen: int, threads: int) -> dict:
    page = browser.new_page()
    page.set_default_timeout(600_000)
    page.goto(url + "bench.html")
    page.wait_for_function("window.benchReady === true")
    got = page.evaluate("([p, n, t]) => window.bench('/model.gguf', p, n, t)", [prompt, n_gen, threads])
    page.close()
    stamps = got["stamps"]
    got["tps_stream"] = (len(stamps) - 1) / ((stamps[-1] - stamps[0]) / 1000) if len(stamps) > 1 else 0.0
    got["tps_llama"] = (got["timings"] or {}).get("predicted_per_second", 0.0)
    got["chunks"] = len(stamps)
    del got["stamps"]
    return got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny-qwen2", "smollm2"], choices=list(GGUF_SOURCE))
    ap.add_argument("--quants", nargs="+", default=["Q4_0", "Q8_0"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--n-gen", type=int, default=48)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "web_wllama.jsonl")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    dist = wllama_dist()
    exe = ws.find_browser()
    if exe is None:
        sys.exit("no Chromium found: apt-get install chromium, or set EDGEPACK_CHROMIUM")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=ws.BROWSER_ARGS)
        for name in args.models:
            bundle = web_bundle(name)
            config = json.loads(ws.page_files(bundle)["web/edgepack-web.json"])
            manifest = json.loads((bundle / "manifest.json").read_text())
            model_dir = (bundle / manifest["model_file"]).parent
            prompt = config["chat"]["prefix"] + MESSAGE + config["chat"]["suffix"]
            from tokenizers import Tokenizer

            prompt_ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(
                prompt, add_special_tokens=False).ids
            sides = [f"wllama_{q}" for q in args.quants] + ["native"]
            samples: dict[str, list[float]] = {s: [] for s in sides}
            llama_tps: dict[str, list[float]] = {s: [] for s in sides if s != "native"}
            info: dict[str, dict] = {}
            for r in range(args.rounds):
                for side in sides:  # A B C A B C
                    if side == "native":
                        tps = native_tps(model_dir, config, prompt_ids, args.n_gen, args.threads)
                    else:
                        quant = side.split("_", 1)[1]
                        gguf = gguf_path(name, quant)
                        overlay = {"bench.html": PAGE, "model.gguf": gguf.read_bytes(),
                                   **{f"_wllama/{f}": (dist / f).read_bytes() for f in WLLAMA_FILES.values()}}
                        with ws.PageServer(dist, overlay, ws.ort_web_dist(), isolated=True) as srv:
                            got = wllama_run(browser, srv.url, prompt, args.n_gen, args.threads)
                        assert got["multiThread"], got
                        tps = got["tps_stream"]
                        llama_tps[side].append(got["tps_llama"])
                        info[side] = {"gguf_bytes": gguf.stat().st_size, "load_ms": got["loadMs"],
                                      "chunks": got["chunks"], "predicted_n": (got["timings"] or {}).get("predicted_n"),
                                      "text": got["text"][:200]}
                    samples[side].append(tps)
                    print(f"{name} round {r + 1} {side}: {tps:.1f} tokens/s", file=sys.stderr)
            record = {
                "benchmark": "web_wllama", "model": name, "threads": args.threads, "n_gen": args.n_gen,
                "rounds": args.rounds, "host": platform.node(), "browser": browser.version, "wllama": WLLAMA_VERSION,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "load_avg": [round(x, 2) for x in os.getloadavg()],
                "decode_tokens_per_s": {s: statistics.median(v) for s, v in samples.items()}, "samples": samples,
                "llama_cpp_timings_tps": llama_tps,
                "ratio_vs_native": {s: statistics.median([w / n for w, n in zip(samples[s], samples["native"])])
                                    for s in sides if s != "native"},
                "ratio_spread": {s: [min(w / n for w, n in zip(samples[s], samples["native"])),
                                     max(w / n for w, n in zip(samples[s], samples["native"]))]
                                 for s in sides if s != "native"},
                "runs": info, "target": {"ratio_vs_native": 0.25},
            }
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(record) + "\n")
            print(json.dumps({k: record[k] for k in ("model", "decode_tokens_per_s", "ratio_vs_native",
                                                     "ratio_spread", "load_avg")}), file=sys.stderr)
        browser.close()


if __name__ == "__main__":
    main()
