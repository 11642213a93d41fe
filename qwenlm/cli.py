"""The `qwenlm` command: chat, generate, serve, quantize, merge, eval, make-tiny."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qwenlm.hub import DEFAULT_MODEL


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"checkpoint folder or hub name (default {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (the official rule), bf16, fp16 or fp32")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: per-channel int8 weights made at load time from a bf16/fp16 folder")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8"], default="auto",
                   help="KV cache storage: auto (the model dtype) or int8 (~1.9x the tokens per GB)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a LoRA adapter folder (PEFT format) merged into the weights at load time")


def _tp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                   help="split the model over N GPUs, one process each (N divides the head count; default 1)")


def _load(args):
    import qwenlm
    from qwenlm.engine import EngineConfig
    return qwenlm.load(args.model, device=args.device, dtype=args.dtype, quantize=args.quantize,
                       engine_config=EngineConfig(kv_cache_dtype=args.kv_cache_dtype), adapter=args.adapter,
                       tensor_parallel_size=getattr(args, "tensor_parallel_size", 1))


def _launched_worker() -> bool:
    """A rank > 0 of a launcher (torchrun): it runs no server and prints nothing; rank 0 does."""
    from qwenlm.engine.tp_launch import launched, launched_rank
    return launched() and launched_rank() > 0


def _shutdown(llm) -> None:
    """Stop a tensor-parallel model's worker processes now rather than at exit."""
    from qwenlm.engine import LLMEngine
    LLMEngine.shutdown_model(llm.model)


def cmd_chat(args) -> int:
    from qwenlm.terminal_chat import TerminalChat
    llm = _load(args)
    try:
        TerminalChat(llm, system=args.system, seed=args.seed).run()
    finally:
        _shutdown(llm)
    return 0


def _generate_overrides(args) -> dict:
    return {k: v for k, v in dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, seed=args.seed).items() if v is not None}


def cmd_generate(args) -> int:
    llm = _load(args)
    overrides = _generate_overrides(args)
    try:
        if args.chat:
            text = "".join(llm.chat_stream(args.prompt, system=args.system, **overrides))
        else:
            text = llm.generate(args.prompt, **overrides)
    finally:
        _shutdown(llm)
    print(text)
    return 0


def cmd_make_tiny(args) -> int:
    from qwenlm.testing import make_tiny_checkpoint
    out = make_tiny_checkpoint(args.out_dir, layout=args.layout, seed=args.seed, force=args.force)
    print(f"wrote a tiny random Qwen v1 checkpoint to {out} (try: qwenlm chat --model {out})")
    return 0


def cmd_serve(args) -> int:
    from qwenlm.engine.core_client import EngineStartError
    from qwenlm.parallel.tp import TPError
    from qwenlm.server.api import serve
    if Path(args.model).is_dir():  # the model is served under the folder's name, which "." does not show
        args.model = os.path.abspath(args.model)
    try:
        if args.tensor_parallel_size > 1 and _launched_worker():  # rank 0 serves; the others only follow its steps
            _load(args)  # never returns: the rank exits when rank 0 stops
        return serve(args) or 0
    except KeyboardInterrupt:  # Ctrl-C: uvicorn re-raises it once both processes have shut down cleanly
        return 130
    except (EngineStartError, TPError) as e:  # the engine process logged the details above; or the model cannot
        print(f"qwenlm: error: {e}", file=sys.stderr)  # be split over --tensor-parallel-size ranks / GPUs here
        return 1


def cmd_quantize(args) -> int:
    from qwenlm.quantize import main as quantize_main
    return quantize_main(args) or 0


def cmd_merge(args) -> int:
    from qwenlm.merge import merge_to_folder
    try:
        path = merge_to_folder(args.base, args.adapter, args.out, device=args.device)
    except KeyboardInterrupt:
        return 130
    print(f"wrote {path} (quantize it with: qwenlm quantize --model {path} --data CALIB --out {path}-Int4)")
    return 0


def cmd_eval(args) -> int:
    if args.benchmark == "ppl":
        from qwenlm.eval.ppl import run
    else:
        from qwenlm.eval.run import run
    try:
        run(args, lambda: _load(args))
    except KeyboardInterrupt as e:
        print(f"\nqwenlm: interrupted: {e}", file=sys.stderr)
        return 130
    return 0


def cmd_finetune(args) -> int:
    from qwenlm.train.config import from_args
    from qwenlm.train.trainer import finetune
    out = finetune(from_args(args))
    print(f"wrote {out} (loss curve: {out / 'loss.csv'}, {out / 'loss.png'})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenlm", description="Run, serve and quantize Qwen (v1) chat models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("chat", help="interactive terminal chat")
    _model_args(p)
    _tp_arg(p)
    p.add_argument("--system", default="You are a helpful assistant.", help="system prompt")
    p.add_argument("--seed", type=int, default=1234)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="one-shot generation")
    _model_args(p)
    _tp_arg(p)
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="answer the prompt as a chat query (ChatML)")
    p.add_argument("--system", default="You are a helpful assistant.")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the official layout")
    p.add_argument("out_dir")
    p.add_argument("--layout", default="safetensors", choices=["safetensors", "sharded", "bin", "sharded-bin"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a folder that already holds files, "
                                                        "replacing those of the same names")
    p.set_defaults(func=cmd_make_tiny)

    p = sub.add_parser("serve", help="OpenAI-compatible API server and web chat")
    _model_args(p)
    _tp_arg(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 exposes the model to the "
                        "network: set a key)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this key (or set QWENLM_API_KEY); empty is an error")
    p.add_argument("--allowed-origins", default=None, metavar="ORIGIN[,ORIGIN...]",
                   help="web pages of these origins (https://app.example.com, or *) may call the API (CORS); "
                        "default none: browser requests from other sites get 403")
    p.add_argument("--allowed-hosts", default=None, metavar="HOST[,HOST...]",
                   help="Host header names to accept besides localhost/127.0.0.1/::1 when bound to a loopback "
                        "address (e.g. behind a local reverse proxy); elsewhere, the only names accepted")
    p.add_argument("--timeout-graceful-shutdown", type=float, default=10.0, metavar="SECONDS",
                   help="on SIGTERM, let running requests finish for this long, then end them (default 10)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("quantize", help="GPTQ-quantize a checkpoint into the official Int4/Int8 format")
    p.add_argument("--model", "-m", required=True)
    p.add_argument("--data", required=True, help="calibration data: conversation JSON or plain text")
    p.add_argument("--bits", type=int, choices=[4, 8], default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("merge", help="merge a LoRA adapter into its base model, written as a normal checkpoint")
    p.add_argument("--base", required=True, metavar="DIR", help="the bf16/fp16 checkpoint the adapter was trained on")
    p.add_argument("--adapter", required=True, metavar="DIR", help="the adapter folder (PEFT format)")
    p.add_argument("--out", required=True, metavar="DIR", help="a new folder for the merged checkpoint")
    p.add_argument("--device", default="cpu", help="where to merge (default cpu)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("eval", help="the official benchmarks: MMLU, C-Eval, CMMLU, GSM8K, HumanEval, tool use "
                                    "(plugin); long-context perplexity (ppl)")
    p.add_argument("benchmark", choices=["mmlu", "ceval", "cmmlu", "gsm8k", "humaneval", "plugin", "ppl"])
    _model_args(p)
    p.add_argument("--data", required=True, help="the benchmark's folder (mmlu, ceval, cmmlu) or .jsonl file "
                                                 "(gsm8k, humaneval), in the official layout (docs/eval.md), "
                                                 "or a `datasets` hub name (cais/mmlu, openai/gsm8k, ...); "
                                                 "plugin: the folder of the two exam_plugin jsonl files, or one "
                                                 "of them; ppl: a plain text file")
    p.add_argument("--lengths", default="1024,2048,4096,8192,16384,32768", metavar="L,L",
                   help="ppl: context lengths in tokens (default 1024,...,32768)")
    p.add_argument("--chat", action="store_true", help="a chat model: 0-shot questions, greedy replies, "
                                                       "the official answer extraction (plugin: always)")
    p.add_argument("--shots", type=int, default=None, help="few-shot examples for base-model multiple choice "
                                                           "(default 5; -1: the whole dev split)")
    p.add_argument("--fewshot-prompt", default=None, metavar="FILE",
                   help="base-model GSM8K: the 8-shot prompt file (the official gsm8k_prompt.txt)")
    p.add_argument("--subjects", default=None, metavar="A,B", help="only these subjects (default: all)")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N items of each subject (or of the file)")
    p.add_argument("--out", default="qwenlm-eval", metavar="DIR",
                   help="results folder; <DIR>/<benchmark>-<base|chat>/ keeps the items, so a rerun resumes "
                        "(default qwenlm-eval)")
    p.add_argument("--batch-size", type=int, default=8, help="items per forward or engine batch (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="generation length limit (default: the checkpoint's generation_config)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("finetune", help="fine-tune on conversations: full, LoRA or Q-LoRA (docs/finetune.md)")
    from qwenlm.train.config import add_arguments as add_finetune_arguments
    add_finetune_arguments(p)
    p.set_defaults(func=cmd_finetune)
    return parser


def check_args(args) -> None:
    """Every argument checked before a model loads (which can take minutes): one clear error, exit 2."""
    from qwenlm.config import GenerationConfig
    from qwenlm.loading import check_device, check_tensor_parallel, parse_dtype
    from qwenlm.sampling import check_seed
    check_device(getattr(args, "device", None))
    parse_dtype(getattr(args, "dtype", None))
    check_tensor_parallel(getattr(args, "tensor_parallel_size", 1), getattr(args, "quantize", None),
                          getattr(args, "adapter", None))
    if args.command in ("chat", "generate", "serve"):  # under torchrun: one process per rank
        from qwenlm.engine.tp_launch import check_launch
        check_launch(args.tensor_parallel_size)
    if getattr(args, "adapter", None) is not None:
        from qwenlm.adapters import read_adapter_config
        read_adapter_config(args.adapter)
    if args.command in ("chat", "make-tiny"):
        check_seed("seed", args.seed)
    elif args.command == "generate":
        GenerationConfig().replace(**_generate_overrides(args))  # the rules every setting goes through
    elif args.command == "eval" and args.benchmark == "ppl":
        from qwenlm.eval.ppl import check_args as check_ppl_args
        check_ppl_args(args)
    elif args.command == "eval":
        from qwenlm.eval.run import check_args as check_eval_args
        check_eval_args(args)
    elif args.command == "serve":
        from qwenlm.server.launch import check_listen_address
        check_listen_address(args.host, args.port)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as e:  # our errors name the file/field; no traceback
        print(f"qwenlm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
