"""The official Qwen benchmarks (MMLU, C-Eval, CMMLU, GSM8K, HumanEval): their files, prompts and scoring,
as the official `eval/` scripts do them, independent of how the model is run.

data.py reads the files, prompts.py builds the text, choice.py scores base models by the next letter
token through any `next_token_logprobs` backend (model_logprobs.py: a plain forward), extract.py reads
chat replies and completions, sandbox.py executes HumanEval programs, results.py totals and tabulates; run.py drives `qwenlm eval`,
keeping each finished item in cache.py's items file so a rerun resumes.
"""
