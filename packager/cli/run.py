"""`pack run` and `pack chat`: generate with a bundle, once or as a conversation."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from packager.cli.chat_session import chat_session, write_reply
from packager.runtime import load

# Options `pack run` and `pack chat` share.
_deterministic = click.option(
    "--deterministic", is_flag=True,
    help="Evaluate the prompt as a fresh load would (bit-for-bit reproducible output); by default the model reads "
         "only what its cache lacks, which can flip a near-tie.")
_think = click.option(
    "--think/--no-think", default=None,
    help="A thinking model (Qwen3, SmolLM3): reason before answering, or answer at once (the template's switch). "
         "Default: the template's own. --think also shows the reasoning, dimmed, before the answer.")

@click.command("run")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--chat/--raw", default=True, show_default=True, help="Wrap PROMPT in the chat template, or complete it raw.")
@click.option("-n", "--max-tokens", type=int, default=256, show_default=True, help="Tokens to generate at most.")
@click.option("--temperature", type=float, help="Sampling temperature (0: greedy). Default: the bundle's.")
@click.option("--seed", type=int, help="Sampling seed, for reproducible output.")
@click.option("--threads", "n_threads", type=int, help="Threads. Default: the physical cores this process may use.")
@_deterministic
@_think
def run_cmd(bundle: Path, prompt: str, chat: bool, max_tokens: int, temperature: float | None, seed: int | None,
            n_threads: int | None, deterministic: bool, think: bool | None) -> None:
    """Answer PROMPT with BUNDLE, streaming the text to stdout.

    \b
    Example:
      pack run dist/SmolLM2-135M-Instruct-laptop "Name three colours."
    """
    opts: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
    if think is not None and not chat:
        raise click.UsageError("--think/--no-think switch a chat template; drop them with --raw")
    with load(bundle, n_threads=n_threads, deterministic=deterministic) as m:
        pieces = (m.chat([{"role": "user", "content": prompt}], stream=True, think=think, **opts) if chat
                  else m.stream(prompt, **opts))
        write_reply(pieces, sys.stdout, show_reasoning=bool(think))
    click.echo()


@click.command("chat")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--system", help="A system message that starts the conversation. Default: the template's own.")
@click.option("-n", "--max-tokens", type=int, default=512, show_default=True, help="Tokens per reply at most.")
@click.option("--temperature", type=float, help="Sampling temperature (0: greedy). Default: the bundle's.")
@click.option("--top-p", type=float, help="Nucleus sampling: keep the most likely tokens up to this probability.")
@click.option("--top-k", type=int, help="Sample among the k most likely tokens only (0: all).")
@click.option("--repeat-penalty", type=float, help="Penalty for repeating recent tokens (1: none).")
@click.option("--seed", type=int, help="Sampling seed, for reproducible replies.")
@click.option("--ctx", "n_ctx", type=int, help="Context length. Default: the bundle's.")
@click.option("--threads", "n_threads", type=int, help="Threads. Default: the physical cores this process may use.")
@_deterministic
@_think
@click.option("--prompt-cache", type=click.Path(file_okay=False, path_type=Path),
              help="Folder where the system prompt's state is saved once read, and restored at the next start "
                   "(GGUF bundles).")
def chat_cmd(bundle: Path, system: str | None, max_tokens: int, temperature: float | None, top_p: float | None,
             top_k: int | None, repeat_penalty: float | None, seed: int | None, n_ctx: int | None,
             n_threads: int | None, deterministic: bool, think: bool | None, prompt_cache: Path | None) -> None:
    """Talk with BUNDLE: each reply streams to stdout, the conversation is kept.

    Ctrl-C during a reply stops it and returns to the prompt; Ctrl-D, /exit or
    /quit ends the session; /reset forgets the conversation. Reads lines from
    stdin, so it can be scripted too. Each turn reads only the new message: the
    conversation so far stays in the model's cache.

    \b
    Examples:
      pack chat dist/SmolLM2-135M-Instruct-laptop
      pack chat dist/Qwen2.5-0.5B-Instruct-laptop --system "Answer in French." --temperature 0.7
      printf 'Hi!\\nName a colour.\\n' | pack chat dist/SmolLM2-135M-Instruct-laptop -n 64
      pack chat dist/SmolLM2-135M-Instruct-laptop --system "$(cat rules.txt)" --prompt-cache ~/.cache/myapp
    """
    opts: dict[str, Any] = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k,
                            "repeat_penalty": repeat_penalty, "seed": seed}
    with load(bundle, n_threads=n_threads, n_ctx=n_ctx, deterministic=deterministic, prompt_cache=prompt_cache) as m:
        m.thinking.context(think)  # a --think the template cannot do: one line now, not after the first message
        chat_session(m, system=system, opts=opts, think=think)
