// edgepack's chat page: the bundle's ONNX model in onnxruntime-web, greedy decoding with a KV cache,
// the reply streamed into the page. WebGPU where the browser gives an adapter, WASM otherwise.
//
// edgepack-web.json (written by packager/bundle/web.py; paths relative to this page):
//   schema            1
//   name              model name shown in the header
//   model             {graph, wasm_graph, external_data: [{path, url}], tokenizer, bytes}; wasm_graph (or null):
//                     the graph WASM runs, int4 unpacked to f32 at load (WASM has no int4 kernel), same data
//   io                graph input/output names; past_*/present_* hold %d for the layer; attention_mask and
//                     position_ids may be null (the graph lacks them)
//   kv                {n_layers, n_kv_heads, head_dim, dtype: "float32" | "float16"}
//   vocab_size, context_length, eos_token_ids
//   chat              {prefix, suffix}: the chat template rendered around one user message
//   generation        {max_new_tokens}
//   prefill_chunk     prompt tokens per pass of the graph
//   ort               {version, base_url}: where onnxruntime-web's dist/ files come from
// Query parameters: ?ort=<base url> (instead of ort.base_url), ?backend=wasm|webgpu, ?max_tokens=N,
// ?prefill_chunk=N, ?threads=N (WASM threads; default: up to 4 where the page is cross-origin isolated),
// ?wasm_graph=0 (WASM runs the int4 graph: slow, for comparison), ?ignore_eos=1 (decode max_tokens: benchmarks).
//
// For tests and tools: window.edgepackReady (a promise of {backend, graph, threads, isolated, load_ms, max_pass}:
// max_pass, tokens per pass where the backend caps the prompt's passes, else null),
// window.edgepackTokenizer, and after
// each reply window.edgepackLastRun = {backend, prompt_ids, tokens, text, tps, prefill_ms, top, timing, done}
// (top: the 8 best [token id, logit] of each step, in order; timing: the decode steps' time summed by part,
// as benchmarks/web_page.py reports it).

import { BPETokenizer } from "./tokenizer.js";

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const TOP_K = 8;

function setStatus(text, isError = false) {
  const el = $("status");
  el.textContent = text;
  el.classList.toggle("error", isError);
}

function fmtMB(n) { return `${(n / 1e6).toFixed(1)} MB`; }

function layerNames(pattern, n) { return Array.from({ length: n }, (_, i) => pattern.replace("%d", String(i))); }

async function fetchJSON(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  return r.json();
}

// The whole file, reporting progress; into one preallocated buffer when the size is known.
async function fetchBytes(url, onBytes, integrity = "") {
  // integrity (SRI, from ship/web/parts.json): the browser refuses bytes that do not match it.
  const r = await fetch(url, integrity ? { integrity } : {});
  if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
  const total = Number(r.headers.get("content-length")) || 0;
  if (!r.body) return new Uint8Array(await r.arrayBuffer());
  const reader = r.body.getReader();
  let buf = new Uint8Array(total), off = 0, chunks = null;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (!chunks && off + value.length > buf.length) chunks = [buf.subarray(0, off)];  // compressed or unknown size
    if (chunks) chunks.push(value); else buf.set(value, off);
    off += value.length;
    onBytes(value.length);
  }
  if (!chunks) return off === buf.length ? buf : buf.subarray(0, off);
  buf = new Uint8Array(off);
  let at = 0;
  for (const c of chunks) { buf.set(c, at); at += c.length; }
  return buf;
}

async function webgpuAdapter() {
  if (!("gpu" in navigator)) return [null, "this browser has no WebGPU"];
  try {
    const adapter = await navigator.gpu.requestAdapter({ powerPreference: "high-performance" });
    return adapter ? [adapter, ""] : [null, "no WebGPU adapter"];
  } catch (e) {
    return [null, `WebGPU adapter request failed: ${e.message || e}`];
  }
}

// WASM threads: more than one needs SharedArrayBuffer, i.e. a cross-origin isolated page (COOP/COEP headers,
// as `pack serve` sends them).
function wasmThreads() {
  if (!self.crossOriginIsolated) return 1;
  return Number(params.get("threads")) || Math.min(4, navigator.hardwareConcurrency || 1);
}

// A module using one SIMD128 instruction (i8x16.splat): onnxruntime-web's WASM builds all need SIMD.
function wasmSimd() {
  const bytes = [0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 10, 1, 8, 0, 65, 0, 253, 15,
                 253, 98, 11];
  try { return typeof WebAssembly === "object" && WebAssembly.validate(new Uint8Array(bytes)); } catch { return false; }
}

async function importOrt(base, file) {
  const ort = await import(base + file);
  ort.env.wasm.wasmPaths = base;
  ort.env.wasm.numThreads = wasmThreads();
  ort.env.logLevel = "error";
  return ort;
}

// float16 logits arrive as raw halves (Uint16Array) where the engine has no Float16Array.
function halfToFloat(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, f = h & 0x3ff;
  if (e === 0) return s * 2 ** -14 * (f / 1024);
  if (e === 31) return f ? NaN : s * Infinity;
  return s * 2 ** (e - 15) * (1 + f / 1024);
}

// onnxruntime-web 1.31.1's WebGPU attention is wrong for a pass of 32 tokens or more on an adapter with 4-lane
// subgroups (SwiftShader's; a mobile GPU may have them too): every query past the 4th attends to keys it should
// not. Measured on one GroupQueryAttention node against ONNX Runtime's CPU kernel (tests/attention_node.py):
// 31 tokens agree to 1e-6, 32 are off by 20-130% from position 4 on, packed or separate q/k/v, rotary or not,
// with or without a cache. Its source reads why: the flash-attention prefill walks the keys min(subgroup size,
// 16) at a time but scores at least 8 per step. Passes of at most 31 tokens agree, so the prompt goes in those
// there; adapters whose subgroups have 8 lanes or more keep the bundle's prefill_chunk.
const SMALL_SUBGROUP_MAX_PASS = 31;
const MIN_FLASH_SUBGROUP = 8;

function webgpuMaxPass(adapter) {
  const lanes = adapter?.info?.subgroupMinSize;
  return lanes !== undefined && lanes < MIN_FLASH_SUBGROUP ? SMALL_SUBGROUP_MAX_PASS : Infinity;
}

// The TOP_K best [id, logit] of one row of logits, best first. Ties go to the lower id, as argmax does.
// The bar to enter is kept in a local: read from the list on every logit, the scan of Qwen2.5's 151k
// vocabulary took 2.6 ms in headless Chromium against 1.3 ms (the same 40 rows, load 5.5).
function topK(row, isHalf) {
  const best = [];
  let full = false, bar = -Infinity;
  for (let i = 0; i < row.length; i++) {
    const v = isHalf ? halfToFloat(row[i]) : row[i];
    if (full && v <= bar) continue;
    let j = best.length;
    while (j > 0 && best[j - 1][1] < v) j--;
    best.splice(j, 0, [i, v]);
    if (best.length > TOP_K) best.pop();
    full = best.length === TOP_K;
    if (full) bar = best[TOP_K - 1][1];
  }
  return best;
}

class Chat {
  constructor(cfg, ort, session, tokenizer, backend) {
    Object.assign(this, { cfg, ort, session, tokenizer, backend });
    const { io, kv } = cfg;
    this.pastNames = [...layerNames(io.past_key, kv.n_layers), ...layerNames(io.past_value, kv.n_layers)];
    this.presentNames = [...layerNames(io.present_key, kv.n_layers), ...layerNames(io.present_value, kv.n_layers)];
    this.eos = new Set(cfg.eos_token_ids);
    this.maxPass = Infinity;  // tokens per pass of the graph the backend computes right (webgpuMaxPass)
  }

  emptyPast() {
    const { n_kv_heads, head_dim, dtype } = this.cfg.kv;
    const empty = dtype === "float16" ? new Uint16Array(0) : new Float32Array(0);
    const past = {};
    for (const name of this.pastNames) past[name] = new this.ort.Tensor(dtype, empty, [1, n_kv_heads, 0, head_dim]);
    return past;
  }

  int64(values, dims) {
    return new this.ort.Tensor("int64", BigInt64Array.from(values, (v) => BigInt(v)), dims);
  }

  // Greedy reply to one user message; onText(run) after each token.
  async reply(message, maxTokens, onText) {
    const { cfg, tokenizer, session } = this;
    const { io } = cfg;
    const promptIds = tokenizer.encode(cfg.chat.prefix + message + cfg.chat.suffix);
    const maxNew = Math.min(maxTokens, cfg.context_length - promptIds.length);
    if (maxNew < 1) {
      throw new Error(`the message takes ${promptIds.length} tokens; the context holds ${cfg.context_length}`);
    }
    const run = {
      backend: this.backend, prompt_ids: promptIds, tokens: [], text: "", tps: 0, prefill_ms: 0, top: [], done: false,
    };
    window.edgepackLastRun = run;
    const decoder = tokenizer.streamDecoder();
    let past = this.emptyPast(), pos = 0;

    // Where a decode step's time goes (the passes after the prompt's), for benchmarks/web_page.py: building
    // the feeds, session.run (which copies the KV cache into the WASM heap and every output out of it), the
    // top-k over the vocabulary, detokenizing and painting, and the yield to the event loop.
    const timing = { steps: 0, feeds_ms: 0, run_ms: 0, topk_ms: 0, text_ms: 0, yield_ms: 0, kv_bytes: 0,
                     logits_bytes: 0 };
    run.timing = timing;
    let decoding = false;
    const clock = (key, t) => { const now = performance.now(); if (decoding) timing[key] += now - t; return now; };

    // One pass of the graph over `ids` after the cache; the best logits of the last position.
    const forward = async (ids) => {
      let t = performance.now();
      const feeds = { ...past };
      const total = pos + ids.length;
      feeds[io.input_ids] = this.int64(ids, [1, ids.length]);
      if (io.attention_mask) feeds[io.attention_mask] = this.int64(new Array(total).fill(1), [1, total]);
      if (io.position_ids) feeds[io.position_ids] = this.int64(ids.map((_, i) => pos + i), [1, ids.length]);
      t = clock("feeds_ms", t);
      const out = await session.run(feeds);
      t = clock("run_ms", t);
      for (const name of this.pastNames) if (feeds[name].location === "gpu-buffer") feeds[name].dispose();
      past = {};
      this.presentNames.forEach((name, i) => { past[this.pastNames[i]] = out[name]; });
      pos = total;
      const logits = out[io.logits];
      const V = logits.dims[logits.dims.length - 1], n = logits.dims[logits.dims.length - 2];
      const best = topK(logits.data.subarray((n - 1) * V, n * V), logits.type === "float16");
      clock("topk_ms", t);
      if (decoding) {
        timing.steps += 1;
        timing.logits_bytes = logits.data.byteLength;
        timing.kv_bytes = Object.values(past).reduce((a, x) => a + (x.location === "cpu" ? x.data.byteLength : 0), 0);
      }
      return best;
    };

    try {
      const t0 = performance.now();
      // The prompt a chunk at a time, as packager.load's runtime feeds it: one pass returns every
      // position's logits, which for a long prompt would be prompt x vocabulary floats.
      const chunk = Math.min(Number(params.get("prefill_chunk")) || cfg.prefill_chunk || promptIds.length,
                             this.maxPass);
      let top;
      for (let i = 0; i < promptIds.length; i += chunk) top = await forward(promptIds.slice(i, i + chunk));
      const tFirst = performance.now();
      run.prefill_ms = tFirst - t0;
      decoding = true;
      for (;;) {
        run.top.push(top);
        const next = top[0][0];
        if (this.eos.has(next) && params.get("ignore_eos") !== "1") break;
        let t = performance.now();
        run.tokens.push(next);
        run.text += decoder.push(next);
        // Decode speed: the passes after the prompt's, over their time.
        if (run.tokens.length > 1) run.tps = (run.tokens.length - 1) / ((performance.now() - tFirst) / 1000);
        onText(run);
        t = clock("text_ms", t);
        if (run.tokens.length >= maxNew) break;
        await new Promise((r) => setTimeout(r, 0));  // let the page paint the new text
        clock("yield_ms", t);
        top = await forward([next]);
      }
      run.text += decoder.flush();
    } finally {
      for (const t of Object.values(past)) if (t.location === "gpu-buffer") t.dispose();
    }
    run.done = true;
    onText(run);
    return run;
  }
}

async function start() {
  const cfg = await fetchJSON("edgepack-web.json");
  if (cfg.schema !== 1) throw new Error(`edgepack-web.json schema ${cfg.schema} is newer than this page`);
  $("model-name").textContent = cfg.name;
  document.title = `${cfg.name} · edgepack chat`;
  const base = (params.get("ort") || cfg.ort.base_url).replace(/\/?$/, "/");
  const wanted = params.get("backend");

  setStatus("loading the tokenizer…");
  const tokenizer = await BPETokenizer.load(cfg.model.tokenizer);
  window.edgepackTokenizer = tokenizer;

  let [adapter, why] = wanted === "wasm" ? [null, "?backend=wasm"] : await webgpuAdapter();
  if (wanted === "webgpu" && !adapter) throw new Error(`WebGPU was asked for but ${why}`);
  if (!adapter && !wasmSimd()) {
    throw new Error(`this browser has neither WebGPU (${why}) nor WebAssembly SIMD, which onnxruntime-web needs; ` +
                    "use a current Chrome, Edge, Firefox or Safari");
  }

  // The bundle's parts manifest (pack/shipping.py) gives each model file's SRI hash; a page copied
  // without it still loads, unchecked. Its paths are the bundle's; this page sits in web/.
  const sri = {};
  try {
    for (const p of (await fetchJSON("../ship/web/parts.json")).parts) sri["../" + p.path] = p.integrity;
  } catch (e) { console.warn(`no parts manifest (${e.message || e}): model files are not integrity-checked`); }
  let loaded = 0;
  const tLoad = performance.now();
  const progress = (n) => {
    loaded += n;
    const pct = cfg.model.bytes ? ` (${Math.min(100, (100 * loaded) / cfg.model.bytes).toFixed(0)}%)` : "";
    setStatus(`loading the model: ${fmtMB(loaded)} of ${fmtMB(cfg.model.bytes)}${pct}`);
    const bar = $("progress");
    if (bar) { bar.max = cfg.model.bytes || 1; bar.value = loaded; }
  };
  // The graph each backend runs (a few hundred kB of protobuf; the weights are shared).
  const graphUrl = (backend) => (backend === "wasm" && cfg.model.wasm_graph && params.get("wasm_graph") !== "0"
                                 ? cfg.model.wasm_graph : cfg.model.graph);
  const graphs = {};
  const graphFor = async (backend) => {
    const url = graphUrl(backend);
    if (!graphs[url]) graphs[url] = await fetchBytes(url, () => {}, sri[url]);
    return graphs[url];
  };
  const external = [];
  for (const d of cfg.model.external_data) {
    external.push({ path: d.path, data: await fetchBytes(d.url, progress, sri[d.url]) });
  }
  window.edgepackIntegrity = Object.keys(sri).length;  // how many files the page could check (tests)

  // The same bytes serve a second try on WASM after WebGPU failed: onnxruntime-web copies them in.
  async function session(ort, backend) {
    const io = cfg.io, n = cfg.kv.n_layers;
    // logSeverityLevel 3: errors only (WebGPU leaves shape ops on the CPU by design, and ORT warns of it)
    const opts = { executionProviders: [backend], graphOptimizationLevel: "all", externalData: external,
                   logSeverityLevel: 3 };
    if (backend === "webgpu") {
      // The KV cache stays on the GPU between steps; only the logits come back.
      const present = [...layerNames(io.present_key, n), ...layerNames(io.present_value, n)];
      opts.preferredOutputLocation = Object.fromEntries(present.map((p) => [p, "gpu-buffer"]));
    }
    const graph = await graphFor(backend);
    if (graphUrl(backend) === cfg.model.wasm_graph) {
      // fold its DequantizeLinear nodes into f32 weights once (ONNX Runtime keeps them by default)
      opts.extra = { session: { disable_quant_qdq: "1" } };
    }
    setStatus(backend === "wasm" && graphUrl("wasm") === cfg.model.wasm_graph
      ? "starting onnxruntime-web (wasm): unpacking the int4 weights for WASM's f32 kernels…"
      : `starting onnxruntime-web (${backend})…`);
    return ort.InferenceSession.create(graph, opts);
  }

  let ort, sess, backend = "wasm";
  if (adapter) {
    try {
      ort = await importOrt(base, "ort.webgpu.min.mjs");
      ort.env.webgpu.adapter = adapter;
      sess = await session(ort, "webgpu");
      backend = "webgpu";
    } catch (e) {
      why = `WebGPU failed: ${e.message || e}`;
      console.warn(why);
      sess = undefined;
    }
  }
  if (!sess) {
    // the WASM build proper, even after WebGPU's failed: the WebGPU bundle's CPU kernels lack
    // GatherBlockQuantized (onnxruntime-web 1.31.1), which the int4 embedding needs
    ort = await importOrt(base, "ort.wasm.min.mjs");
    sess = await session(ort, "wasm");
  }
  const chat = new Chat(cfg, ort, sess, tokenizer, backend);
  chat.graph = graphUrl(backend);
  chat.threads = backend === "wasm" ? ort.env.wasm.numThreads : 0;
  if (backend === "webgpu") chat.maxPass = webgpuMaxPass(adapter);
  chat.loadMs = performance.now() - tLoad;
  let note = backend === "wasm" && why ? ` (${why})` : "";
  if (Number.isFinite(chat.maxPass)) note += ` · prompt in passes of ${chat.maxPass} tokens (small GPU subgroups)`;
  if (backend === "wasm") {
    note += self.crossOriginIsolated ? ` · ${chat.threads} threads`
      : " · 1 thread: the page is not cross-origin isolated (serve it with COOP/COEP headers, e.g. pack serve)";
  }
  $("backend").textContent = `backend: ${backend}${note}`;
  setStatus(`ready · onnxruntime-web ${cfg.ort.version} · loaded in ${(chat.loadMs / 1000).toFixed(1)} s`);
  if ($("progress")) $("progress").hidden = true;
  return chat;
}

function addMessage(role, text) {
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  el.textContent = text;
  $("log").append(el);
  el.scrollIntoView({ block: "end" });
  return el;
}

const ready = start();
window.edgepackReady = ready.then((chat) => ({
  backend: chat.backend, graph: chat.graph, threads: chat.threads, isolated: self.crossOriginIsolated,
  load_ms: chat.loadMs, max_pass: Number.isFinite(chat.maxPass) ? chat.maxPass : null,
}));

ready.then((chat) => {
  const input = $("input"), send = $("send");
  const maxTokens = Number(params.get("max_tokens")) || chat.cfg.generation.max_new_tokens;
  input.disabled = send.disabled = false;
  input.focus();
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  $("composer").addEventListener("submit", async (e) => {
    e.preventDefault();
    const message = input.value.trim();
    if (!message || send.disabled) return;
    input.value = "";
    input.disabled = send.disabled = true;
    addMessage("user", message);
    const el = addMessage("assistant", "");
    el.classList.add("streaming");
    setStatus("generating…");
    try {
      await chat.reply(message, maxTokens, (run) => {
        el.textContent = run.text;
        if (run.tps) $("tps").textContent = `${run.tps.toFixed(1)} tokens/s (${run.backend})`;
      });
      setStatus("ready");
    } catch (err) {
      setStatus(`error: ${err.message || err}`, true);
      window.edgepackError = String(err.message || err);
    } finally {
      el.classList.remove("streaming");
      input.disabled = send.disabled = false;
      input.focus();
    }
  });
}, (err) => {
  console.error(err);
  window.edgepackError = String(err.message || err);
  setStatus(`error: ${err.message || err}`, true);
});
