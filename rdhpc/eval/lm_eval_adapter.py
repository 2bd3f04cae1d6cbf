"""lm-evaluation-harness adapter: model name `rdhpc`, so the paper's benchmarks run at any depth.

    python -m rdhpc.eval.lm_eval_adapter run --model rdhpc \\
        --model_args checkpoint=runs/x/checkpoints,num_steps=32 --tasks arc_easy --batch_size 8
    # any checkpoint kind rdhpc reads; other args: tokenizer=PATH, init_scale=0, seed=0,
    # exit_threshold=5e-4, cache_slots=4, warm_start=True, max_gen_toks=256

or from Python, after `import rdhpc.eval.lm_eval_adapter` (which registers the name):

    lm_eval.simple_evaluate(model="rdhpc", model_args="checkpoint=...,num_steps=8", tasks=[...])

`python -m rdhpc.eval.lm_eval_adapter` is the harness's own command line with `rdhpc` registered
(the harness finds no third-party models by itself). Scoring: every context starts with the BOS
token (training documents do), sequences longer than the model's context keep their last tokens,
`loglikelihood_rolling` scores disjoint windows, `generate_until` decodes with rdhpc.generate (greedy
unless the task asks for sampling; early exit, cache sharing and warm start as given in model_args).
The initial latent state is the zero state by default (init_scale=0): deterministic scores.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from rdhpc.errors import UserError


def _as_bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("rdhpc")
class RdhpcLM(TemplateLM):
    def __init__(self, checkpoint: str, num_steps: int = 32, tokenizer: str | None = None, batch_size=8,
                 device: str | None = None, init_scale: float = 0.0, seed: int = 0,
                 exit_threshold: float | None = None, cache_slots: int | None = None, warm_start=False,
                 max_gen_toks: int = 256, max_batch_size=None, **unused):
        super().__init__()
        from rdhpc.data.tokenizer import TextTokenizer
        from rdhpc.export import load_checkpoint

        self._device = torch.device(device or "cpu")
        loaded = load_checkpoint(checkpoint, device=self._device)
        self.model = loaded.model
        if not tokenizer:
            tokenizer, missing = loaded.tokenizer_or_none_with_reason()
            if tokenizer is None:
                raise UserError(f"model_args checkpoint={checkpoint}: {missing}; add tokenizer=PATH")
        self.tok = TextTokenizer(tokenizer)
        self.num_steps = int(num_steps)
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> 8
        self.init_scale, self.seed = float(init_scale), int(seed)
        self.exit_threshold = None if exit_threshold in (None, "", "None") else float(exit_threshold)
        self.cache_slots = None if cache_slots in (None, "", "None") else int(cache_slots)
        self.warm_start = _as_bool(warm_start)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = self.model.config.max_seq_len

    # ---- tokens ------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tok.encode(string).tolist()

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tok.decode(tokens)

    # ---- scoring -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _logprobs(self, sequences: list[list[int]]) -> list[torch.Tensor]:
        """log p(token t+1 | tokens <= t) for each sequence: (len - 1,) float32 tensors, in batches
        padded on the right (causal attention: padding never changes earlier positions)."""
        out: list[torch.Tensor | None] = [None] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
        for start in range(0, len(order), self.batch_size_per_gpu):
            chunk = order[start:start + self.batch_size_per_gpu]
            width = max(len(sequences[i]) for i in chunk) - 1
            inputs = torch.full((len(chunk), width), self.tok.pad_id, dtype=torch.long)
            for row, i in enumerate(chunk):
                inputs[row, :len(sequences[i]) - 1] = torch.tensor(sequences[i][:-1])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                logits = self.model(inputs.to(self._device), num_steps=self.num_steps, init_scale=self.init_scale).logits
            logp = F.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(chunk):
                n = len(sequences[i]) - 1
                targets = torch.tensor(sequences[i][1:], device=logp.device)
                out[i] = torch.stack([logp[row, :n].gather(-1, targets[:, None]).squeeze(-1),
                                      (logp[row, :n].argmax(-1) == targets).float()])
        return out  # each (2, n): log-probabilities and greedy flags

    def _fit(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """BOS + context + continuation, keeping the last max_length + 1 tokens; and how many
        continuation tokens are scored."""
        if not context or context[0] != self.tok.bos_id:
            context = [self.tok.bos_id] + context
        tokens = (context + continuation)[-(self.max_length + 1):]
        return tokens, min(len(continuation), len(tokens) - 1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        fitted = [self._fit(context_enc, continuation_enc) for _, context_enc, continuation_enc in requests]
        results = []
        for (tokens, n), scores in zip(fitted, self._logprobs([t for t, _ in fitted])):
            logp, greedy = scores[0, -n:], scores[1, -n:]
            results.append((float(logp.sum()), bool(greedy.all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts: BOS + tokens scored in disjoint windows of max_length."""
        results = []
        for (text,) in [r.args for r in requests]:
            tokens = [self.tok.bos_id] + self.tok_encode(text)
            total, position = 0.0, 1  # tokens[position] is the next token to score
            sequences, counts = [], []
            while position < len(tokens):
                end = min(position + self.max_length, len(tokens))
                begin = max(0, end - self.max_length - 1)  # as much left context as fits
                sequences.append(tokens[begin:end])
                counts.append(end - position)
                position = end
            for scores, n in zip(self._logprobs(sequences), counts):
                total += float(scores[0, -n:].sum())
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from rdhpc.generate import GenerationConfig, Generator

        results = []
        for context, gen_kwargs in [r.args for r in requests]:
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = _as_bool(gen_kwargs.pop("do_sample", False))
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            ids = [self.tok.bos_id] + self.tok_encode(context)
            max_new = max(1, min(max_new, self.max_length - 1))
            ids = ids[-(self.max_length - max_new):]
            config = GenerationConfig(num_steps=self.num_steps, max_new_tokens=max_new,
                                      exit_threshold=self.exit_threshold, cache_slots=self.cache_slots,
                                      warm_start=self.warm_start, temperature=temperature,
                                      top_p=gen_kwargs.get("top_p"), top_k=gen_kwargs.get("top_k"),
                                      init_scale=self.init_scale, seed=self.seed, stop_ids=(self.tok.eos_id,))
            out = Generator(self.model, config).generate(torch.tensor([ids], dtype=torch.long))
            text = self.tok.decode([t for t in out.tokens[0, :out.lengths[0]].tolist() if t != self.tok.eos_id])
            cut = min([text.find(s) for s in until if s and s in text], default=len(text))
            results.append(text[:cut])
        return results


def main() -> None:
    """The harness's command line with `rdhpc` registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
