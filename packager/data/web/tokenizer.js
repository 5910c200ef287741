// A byte-level BPE tokenizer (GPT-2 family: Qwen2, Llama-3, SmolLM2, ...) read from a Hugging Face
// tokenizer.json, for the edgepack web page. It covers what those files use and refuses the rest by name,
// so a model it cannot tokenize fails at load with the reason instead of producing wrong ids:
//   normalizer:    none, NFC/NFD/NFKC/NFKD, Lowercase, Sequence of these
//   pre_tokenizer: Split (Regex or String pattern, every behavior, invert), ByteLevel (with or without
//                  GPT-2's regex), Digits, Sequence of these
//   model:         BPE over byte-level symbols (merges as "a b" or ["a", "b"], ignore_merges)
//   decoder:       ByteLevel
// Added tokens (special or not) are matched in the raw text first, longest first, as the `tokenizers`
// library does; the text between them goes through normalizer, pre-tokenizer and BPE.
// No dependencies; an ES module.

// GPT-2's regex, used by ByteLevel when use_regex is true (tokenizers' byte_level.rs).
const GPT2_SPLIT = "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

// GPT-2's reversible byte <-> printable character table.
const BYTE_TO_CHAR = (() => {
  const table = new Array(256);
  let n = 0;
  for (let b = 0; b < 256; b++) {
    const printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
    table[b] = String.fromCodePoint(printable ? b : 256 + n++);
  }
  return table;
})();
const CHAR_TO_BYTE = new Map(BYTE_TO_CHAR.map((c, b) => [c, b]));

const utf8 = new TextEncoder();

// tokenizer.json regexes are written for Rust's regex / Oniguruma. JavaScript's `u` flag agrees on
// \p{..} classes and lookahead; what it lacks before recent engines is the scoped case-insensitive group
// `(?i:...)` that Llama-3 and Qwen2 use for contractions. Rewrite it as explicit [xX] classes, which every
// engine reads the same way.
export function toJsRegexSource(pattern) {
  let out = "";
  for (let i = 0; i < pattern.length; i++) {
    if (pattern.startsWith("(?i:", i)) {
      let depth = 1, j = i + 4, inner = "";
      for (; j < pattern.length && depth > 0; j++) {
        const c = pattern[j];
        if (c === "\\") { inner += c + pattern[++j]; continue; }
        if (c === "(") depth++;
        if (c === ")") depth--;
        if (depth > 0) inner += c;
      }
      out += "(?:" + caseFold(inner) + ")";
      i = j - 1;
      continue;
    }
    out += pattern[i];
    if (pattern[i] === "\\") out += pattern[++i];
  }
  return out;
}

function caseFold(src) {
  let out = "", inClass = false;
  for (let i = 0; i < src.length; i++) {
    const c = src[i];
    if (c === "\\") { out += c + src[++i]; continue; }
    if (c === "[") inClass = true;
    else if (c === "]") inClass = false;
    const lo = c.toLowerCase(), up = c.toUpperCase();
    if (lo !== up && /[a-z]/i.test(c)) out += inClass ? lo + up : `[${lo}${up}]`;
    else out += c;
  }
  return out;
}

function escapeRegex(s) {
  return s.replace(/[.*+?^${}()|[\]\\\/-]/g, "\\$&");
}

// Cut `text` by the matches of `re` (global) into [piece, isMatch] pairs covering all of it.
function segments(text, re) {
  const out = [];
  let last = 0;
  re.lastIndex = 0;
  for (let m; (m = re.exec(text)) !== null;) {
    if (m[0].length === 0) { re.lastIndex++; continue; }
    if (m.index > last) out.push([text.slice(last, m.index), false]);
    out.push([m[0], true]);
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push([text.slice(last), false]);
  return out;
}

// tokenizers' SplitDelimiterBehavior.
function splitBy(text, re, behavior, invert) {
  const segs = segments(text, re).map(([s, isMatch]) => [s, invert ? !isMatch : isMatch]);
  const out = [];
  switch (behavior) {
    case "Removed":
      for (const [s, m] of segs) if (!m) out.push(s);
      break;
    case "Isolated":
      for (const [s] of segs) out.push(s);
      break;
    case "MergedWithPrevious":
      for (const [s, m] of segs) {
        if (m && out.length) out[out.length - 1] += s; else out.push(s);
      }
      break;
    case "MergedWithNext": {
      let carry = "";
      for (const [s, m] of segs) {
        if (m) carry += s; else { out.push(carry + s); carry = ""; }
      }
      if (carry) out.push(carry);
      break;
    }
    case "Contiguous": {
      let prevMatch = false;
      for (const [s, m] of segs) {
        if (m && prevMatch && out.length) out[out.length - 1] += s; else out.push(s);
        prevMatch = m;
      }
      break;
    }
    default:
      throw new Error(`tokenizer.json: Split behavior ${behavior} is not supported`);
  }
  return out.filter((s) => s.length > 0);
}

function normalizerFn(spec) {
  if (!spec) return (s) => s;
  switch (spec.type) {
    case "NFC": case "NFD": case "NFKC": case "NFKD":
      return (s) => s.normalize(spec.type);
    case "Lowercase":
      return (s) => s.toLowerCase();
    case "Sequence": {
      const fns = spec.normalizers.map(normalizerFn);
      return (s) => fns.reduce((acc, f) => f(acc), s);
    }
    default:
      throw new Error(`tokenizer.json: normalizer ${spec.type} is not supported by this page`);
  }
}

// A pre-tokenizer maps one piece of text to a list of pieces; byte-level ones also map each piece to its
// byte characters, which is the alphabet BPE works in.
function preTokenizerFns(spec, state) {
  if (!spec) return [];
  switch (spec.type) {
    case "Sequence":
      return spec.pretokenizers.flatMap((p) => preTokenizerFns(p, state));
    case "Split": {
      const p = spec.pattern;
      const source = "Regex" in p ? toJsRegexSource(p.Regex) : escapeRegex(p.String);
      const re = new RegExp(source, "gu");
      return [(piece) => splitBy(piece, re, spec.behavior, !!spec.invert)];
    }
    case "Digits": {
      const re = spec.individual_digits ? /\p{N}/gu : /\p{N}+/gu;
      return [(piece) => splitBy(piece, re, "Isolated", false)];
    }
    case "ByteLevel": {
      state.byteLevel = true;
      const re = new RegExp(GPT2_SPLIT, "gu");
      return [(piece) => {
        const p = spec.add_prefix_space && !piece.startsWith(" ") ? " " + piece : piece;
        const parts = spec.use_regex === false ? [p] : splitBy(p, re, "Isolated", false);
        return parts.map(toByteChars);
      }];
    }
    default:
      throw new Error(`tokenizer.json: pre_tokenizer ${spec.type} is not supported by this page`);
  }
}

function toByteChars(s) {
  let out = "";
  for (const b of utf8.encode(s)) out += BYTE_TO_CHAR[b];
  return out;
}

export class BPETokenizer {
  constructor(json) {
    const model = json.model;
    if (!model || model.type !== "BPE") throw new Error(`tokenizer.json: model ${model && model.type} is not BPE`);
    if (model.byte_fallback) throw new Error("tokenizer.json: byte_fallback BPE (SentencePiece style) is not supported");
    if (model.continuing_subword_prefix || model.end_of_word_suffix) {
      throw new Error("tokenizer.json: subword prefixes/suffixes are not supported");
    }
    this.vocab = new Map(Object.entries(model.vocab));
    this.ranks = new Map();
    (model.merges || []).forEach((m, i) => {
      const [a, b] = typeof m === "string" ? m.split(" ") : m;
      this.ranks.set(a + " " + b, i);
    });
    this.ignoreMerges = !!model.ignore_merges;
    this.unk = model.unk_token != null ? this.vocab.get(model.unk_token) : undefined;
    this.idToToken = [];
    for (const [t, id] of this.vocab) this.idToToken[id] = t;

    this.special = new Set();
    this.added = (json.added_tokens || []).slice().sort((a, b) => b.content.length - a.content.length);
    for (const t of this.added) {
      this.idToToken[t.id] = t.content;
      if (t.special) this.special.add(t.id);
    }
    this.addedById = new Map(this.added.map((t) => [t.content, t]));
    this.addedRe = this.added.length
      ? new RegExp(this.added.map((t) => escapeRegex(t.content)).join("|"), "gu") : null;

    this.normalize = normalizerFn(json.normalizer);
    const state = { byteLevel: false };
    this.preTokenizers = preTokenizerFns(json.pre_tokenizer, state);
    if (!state.byteLevel) throw new Error("tokenizer.json: no ByteLevel pre-tokenizer; only byte-level BPE is supported");
    if (json.decoder && json.decoder.type !== "ByteLevel") {
      throw new Error(`tokenizer.json: decoder ${json.decoder.type} is not supported by this page`);
    }
    this.cache = new Map();
  }

  static async load(url) {
    const r = await fetch(url);
    if (!r.ok) throw new Error(`${url}: HTTP ${r.status}`);
    return new BPETokenizer(await r.json());
  }

  // Token ids of `text` with no BOS/EOS added (a chat prompt writes its special tokens itself).
  encode(text) {
    const ids = [];
    for (const [piece, token] of this.splitAdded(text)) {
      if (token) { ids.push(token.id); continue; }
      let pieces = [this.normalize(piece)];
      for (const fn of this.preTokenizers) pieces = pieces.flatMap(fn);
      for (const word of pieces) for (const id of this.bpe(word)) ids.push(id);
    }
    return ids;
  }

  // [text, null] and [content, addedToken] pairs; lstrip/rstrip tokens take the whitespace beside them,
  // single_word tokens match only between non-word characters (tokenizers' AddedToken options).
  splitAdded(text) {
    if (!this.addedRe) return [[text, null]];
    const out = [];
    let last = 0;
    this.addedRe.lastIndex = 0;
    for (let m; (m = this.addedRe.exec(text)) !== null;) {
      const tok = this.addedById.get(m[0]);
      let start = m.index, end = m.index + m[0].length;
      if (tok.single_word) {
        const before = text.slice(0, start), after = text.slice(end);
        if (/[\p{L}\p{N}_]$/u.test(before) || /^[\p{L}\p{N}_]/u.test(after)) continue;
      }
      if (tok.lstrip) while (start > last && /\s/u.test(text[start - 1])) start--;
      if (tok.rstrip) while (end < text.length && /\s/u.test(text[end])) end++;
      if (start > last) out.push([text.slice(last, start), null]);
      out.push([m[0], tok]);
      last = end;
      this.addedRe.lastIndex = end;
    }
    if (last < text.length) out.push([text.slice(last), null]);
    return out;
  }

  // BPE over one pre-tokenized word (already byte characters): repeatedly merge the pair of lowest rank.
  bpe(word) {
    const hit = this.cache.get(word);
    if (hit) return hit;
    let ids;
    if (this.ignoreMerges && this.vocab.has(word)) {
      ids = [this.vocab.get(word)];
    } else {
      let symbols = Array.from(word);
      while (symbols.length > 1) {
        let best = -1, bestRank = Infinity;
        for (let i = 0; i < symbols.length - 1; i++) {
          const r = this.ranks.get(symbols[i] + " " + symbols[i + 1]);
          if (r !== undefined && r < bestRank) { bestRank = r; best = i; }
        }
        if (best < 0) break;
        const a = symbols[best], b = symbols[best + 1], merged = [];
        for (let i = 0; i < symbols.length; i++) {
          if (i < symbols.length - 1 && symbols[i] === a && symbols[i + 1] === b) { merged.push(a + b); i++; }
          else merged.push(symbols[i]);
        }
        symbols = merged;
      }
      ids = [];
      for (const s of symbols) {
        const id = this.vocab.get(s);
        if (id !== undefined) ids.push(id);
        else if (this.unk !== undefined) ids.push(this.unk);
        else throw new Error(`tokenizer: symbol ${JSON.stringify(s)} is not in the vocabulary`);
      }
    }
    if (this.cache.size < 50000) this.cache.set(word, ids);
    return ids;
  }

  // The bytes a token stands for (ByteLevel decoding; characters outside the table count as their UTF-8).
  tokenBytes(id) {
    const t = this.idToToken[id];
    if (t === undefined) return new Uint8Array(0);
    const bytes = [];
    for (const c of t) {
      const b = CHAR_TO_BYTE.get(c);
      if (b !== undefined) bytes.push(b); else bytes.push(...utf8.encode(c));
    }
    return Uint8Array.from(bytes);
  }

  decode(ids, { skipSpecial = true } = {}) {
    const d = this.streamDecoder({ skipSpecial });
    return ids.map((id) => d.push(id)).join("") + d.flush();
  }

  // Text as tokens arrive: a character split across tokens is held until its last byte comes.
  streamDecoder({ skipSpecial = true } = {}) {
    const td = new TextDecoder("utf-8");
    return {
      push: (id) => (skipSpecial && this.special.has(id) ? "" : td.decode(this.tokenBytes(id), { stream: true })),
      flush: () => td.decode(),
    };
  }
}
