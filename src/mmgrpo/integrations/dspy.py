"""DSPy programs under mmGRPO, token-exact: a ``dspy.Module`` runs as an mmgrpo Program.

Each named predictor is a module for grouping (a predictor called in a loop gets invocation
indices). DSPy's adapter formats the messages as it always does; the LM it calls is a ``dspy.LM``
whose engine is ``PolicyEngine``: it applies the chat template once, here, samples through the
current mmgrpo LM (the in-process policy or a policy server) and records the call as a
``ModuleCall`` named after the calling predictor, with the prompt ids, the sampled ids and their
log-probs. DSPy's cache is off (a rollout must be sampled, never replayed), and ChatAdapter's JSON
fallback is off (one predictor call = one LM call, so groups compare like with like). The adapter
is DSPy's configured one (``dspy.configure(adapter=...)``) or ChatAdapter; small models follow
XMLAdapter's or JSONAdapter's format with a few demos far more often than ChatAdapter's.

Prompt steps: DSPy's own optimizers (``dspy.BootstrapFewShot``, ``dspy.MIPROv2``, ``dspy.GEPA``,
...) run on the program with the policy as their LM; the weights step then trains the program
with the instructions and demos they chose. Requires the extra: ``pip install mmgrpo[dspy]``.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable

import dspy
from dspy.lm15 import Message, Response, TextPart, Usage
from dspy.utils.exceptions import AdapterParseError

from .. import trace
from ..lm.base import LM, SamplingParams, current_params, _current_lm
from ..program import Example, ParseError, Prediction, Program, program_inputs, spec_of
from ..trace import ModuleCall


class PolicyEngine:
    """A ``dspy.LM`` engine over mmgrpo's current LM (``fallback`` outside a rollout, e.g. in
    DSPy's own optimizer threads, which do not carry mmgrpo's context)."""

    def __init__(self, program: "DSPyProgram", fallback: LM | None = None, max_tokens: int = 256):
        self.program, self.fallback, self.max_tokens = program, fallback, max_tokens

    def complete(self, request) -> Response:
        lm = _current_lm.get() or self.fallback
        if lm is None:
            raise RuntimeError("no mmgrpo LM: run the DSPy program through mmgrpo (optimize/evaluate) "
                               "or give DSPyProgram a fallback LM")
        messages = chat_messages(request)
        traj = trace.current()
        cfg = request.config
        name = self.program.caller()
        if traj is not None:  # a rollout: mmgrpo's sampling settings and seeds, not DSPy's
            params = current_params().with_(seed=traj.next_seed())
        else:  # DSPy's own calls (an optimizer's): its settings; the program's calls keep the run's cap
            cap = self.program.max_tokens if name != "lm" and self.program.max_tokens else self.max_tokens
            params = SamplingParams(temperature=cfg.temperature or 0.0, max_tokens=cap, seed=cfg.seed,
                                    top_p=cfg.top_p or 1.0)
        if cfg.max_tokens:
            params = params.with_(max_tokens=min(cfg.max_tokens, params.max_tokens))
        if cfg.stop:
            params = params.with_(stop=tuple(cfg.stop))
        out = lm.chat(messages, params)
        trace.record(ModuleCall(module=name, index=0, prompt_ids=out.prompt_ids, completion_ids=out.token_ids,
                                logprobs=out.logprobs, text=out.text, prompt_version=self.program.version(name),
                                messages=messages, policy_version=getattr(lm, "version", 0),
                                temperature=params.temperature, finish_reason=out.finish_reason))
        return Response(id=None, model="mmgrpo", message=Message.assistant([TextPart(out.text)]),
                        finish_reason="length" if out.finish_reason == "length" else "stop",
                        usage=Usage(input_tokens=len(out.prompt_ids), output_tokens=len(out.token_ids),
                                    total_tokens=len(out.prompt_ids) + len(out.token_ids)))

    def stream(self, request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self) -> None:
        pass


def chat_messages(request) -> list[dict]:
    """The plain chat messages of a dspy.lm15 Request (text only: the policy is a text LM)."""
    out = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
        out.append({"role": "system", "content": system})
    for m in request.messages:
        if m.text is None:
            raise ValueError(f"a {m.role} message without text: mmgrpo trains text LMs only")
        out.append({"role": m.role, "content": m.text})
    return out


class DSPyProgram(Program):
    """A dspy.Module as an mmgrpo Program; ``prompt_state`` is DSPy's own ``dump_state``."""

    is_dspy = True  # its metrics have DSPy's signature (result.evaluate wraps them)

    def __init__(self, module, adapter=None, fallback: LM | None = None):
        self.module = module
        self.adapter = single_call(adapter or dspy.settings.adapter or dspy.ChatAdapter())
        self.fallback = fallback
        self.max_tokens: int | None = None  # the program's completion cap outside rollouts (set by compile_step)
        self.input_fields = program_inputs(type(module).forward)  # the class's: module.forward makes DSPy warn
        self.import_spec = spec_of(module)  # result/ rebuilds the DSPy program, then wraps it

    def predictors(self) -> dict[str, Any]:
        return dict(self.module.named_predictors())

    def caller(self) -> str:
        """The name of the predictor making the current LM call (DSPy's module call stack); a copy of
        one (an optimizer's teacher or candidate) is known by its signature's fields."""
        preds = self.module.named_predictors()
        names = {id(p): n for n, p in preds}
        shapes = {tuple(p.signature.fields): n for n, p in preds}
        for m in reversed(dspy.settings.caller_modules or []):
            if id(m) in names:
                return names[id(m)]
            sig = getattr(m, "signature", None)
            if sig is not None and tuple(sig.fields) in shapes:
                return shapes[tuple(sig.fields)]
        return "lm"  # an LM call made outside the program's predictors (e.g. an instruction proposer)

    def version(self, name: str) -> str:
        p = self.predictors().get(name)
        return "" if p is None else f"{len(p.demos)}:{hash(p.signature.instructions) & 0xffffffff:08x}"

    def dspy_lm(self) -> "dspy.LM":
        return dspy.LM("mmgrpo/policy", engine=PolicyEngine(self, self.fallback), cache=False, num_retries=0)

    def forward(self, **inputs: Any) -> Prediction:
        with dspy.context(lm=self.dspy_lm(), adapter=self.adapter):
            try:
                pred = self.module(**inputs)
            except AdapterParseError as exc:
                raise ParseError(self.caller_of_failure(), f"DSPy's {exc.adapter_name} could not parse the reply",
                                 exc.lm_response or "") from exc
        return Prediction(dict(pred.items()))

    def caller_of_failure(self) -> str:
        traj = trace.current()
        return traj.calls[-1].module if traj is not None and traj.calls else "lm"

    def named_modules(self) -> dict:
        return {}  # mmgrpo's own prompt optimizers edit Modules; DSPy's edit predictors (see compile_step)

    def prompt_state(self) -> dict:
        """DSPy's own state of the module (instructions, demos) and the adapter that formats them."""
        return {"dspy": self.module.dump_state(), "adapter": type(self.adapter).__name__}

    def load_prompt_state(self, state) -> None:
        if "dspy" not in state or set(state) - {"dspy", "adapter"}:
            raise KeyError(f"a DSPy program's prompt state is {{'dspy': module.dump_state(), 'adapter': name}}; "
                           f"got keys {sorted(state)}")
        self.module.load_state(state["dspy"])
        if state.get("adapter") and state["adapter"] != type(self.adapter).__name__:
            self.adapter = single_call(getattr(dspy, state["adapter"])())

    def __deepcopy__(self, memo):
        return DSPyProgram(copy.deepcopy(self.module, memo), self.adapter, self.fallback)


def single_call(adapter):
    """The adapter without its JSON fallback: a parse failure then stays one call of its predictor
    (counted as such) instead of a second, differently formatted call under the same name."""
    if getattr(adapter, "use_json_adapter_fallback", False):
        adapter = copy.copy(adapter)
        adapter.use_json_adapter_fallback = False
    return adapter


def to_dspy_example(ex: Example) -> "dspy.Example":
    return dspy.Example(**ex.inputs, **ex.gold).with_inputs(*ex.inputs)


def dspy_metric(metric: Callable) -> Callable[[Example, Prediction], float]:
    """DSPy's metric(example, prediction, trace=None) as mmgrpo's metric(Example, Prediction) -> float."""
    def scored(ex: Example, pred: Prediction) -> float:
        return float(metric(to_dspy_example(ex), dspy.Prediction(**dict(pred))))
    scored.dspy_metric = metric
    scored.import_spec = spec_of(metric)  # result.json names the user's metric, not this wrapper
    return scored


def compile_step(job, kind: str):
    """A DSPy optimizer as a prompt step: it compiles the program's module with the policy as its LM;
    the program keeps the compiled predictors (instructions and demos)."""
    from ..optimizers.bootstrap import SearchResult
    from ..rollout import evaluate

    program: DSPyProgram = job.program
    if not isinstance(program, DSPyProgram):
        raise ValueError(f"strategy step {kind!r} runs a DSPy optimizer: it needs a dspy.Module program; for "
                         f"mmgrpo programs use bootstrap, mipro or gepa")
    name = kind.split(".", 1)[1]
    cls = getattr(dspy, name, None) or getattr(dspy.teleprompt, name, None)
    if cls is None:
        raise ValueError(f"strategy step {kind!r}: dspy has no optimizer {name!r} (e.g. dspy.BootstrapFewShot, "
                         f"dspy.BootstrapFewShotWithRandomSearch, dspy.MIPROv2, dspy.GEPA)")
    cfg, task = job.cfg, job.task
    metric = getattr(task.metric, "dspy_metric", None) or (lambda e, p, trace=None: task.metric(
        Example("x", dict(e.inputs()), dict(e.labels())), Prediction(dict(p.items()))))
    kwargs = optimizer_kwargs(cls, cfg, metric)
    trainset = [to_dspy_example(e) for e in task.train[: cfg.prompt_train_examples]]
    valset = [to_dspy_example(e) for e in job.prompt_val]
    backend = job.backend
    deterministic, backend.deterministic = backend.deterministic, False  # DSPy's threads declare no clients
    program.fallback, program.max_tokens = backend, cfg.max_tokens
    try:
        with dspy.context(lm=program.dspy_lm(), adapter=program.adapter):
            compile_args = {"trainset": trainset}
            if "valset" in inspect.signature(cls.compile).parameters:
                compile_args["valset"] = valset
            compiled = cls(**kwargs).compile(program.module, **compile_args)
    except AdapterParseError as exc:  # DSPy lets some of its own calls' parse failures escape
        raise RuntimeError(
            f"{kind} stopped inside DSPy: a reply of its LM did not parse ({str(exc).splitlines()[0]}). With the "
            f"policy as DSPy's proposer/reflection LM a small model often cannot write DSPy's formats: set "
            f"[prompts] proposer_url (and proposer_model) to a capable OpenAI-compatible LM") from exc
    finally:
        backend.deterministic, program.fallback, program.max_tokens = deterministic, None, None
    program.module = compiled
    ev = evaluate(program, job.prompt_val, task.metric, backend, concurrency=cfg.concurrency, seed=cfg.seed,
                  progress=False, desc=f"{kind} val")
    demos = {n: len(p.demos) for n, p in program.predictors().items()}
    return SearchResult(best=program.prompt_state(), best_score=ev.mean, pool_sizes=demos,
                        extra={"optimizer": kind, "optimizer_kwargs": {k: v if isinstance(v, (int, float, str)) else
                                                                       type(v).__name__ for k, v in kwargs.items()},
                               "val_ci95": ev.ci95})


def optimizer_kwargs(cls, cfg, metric) -> dict:
    """Our [prompts] budget in each optimizer's own terms (only the arguments it takes); with
    [prompts] proposer_url, that LM proposes (MIPROv2's prompt_model) or reflects (GEPA)."""
    proposer = None
    if cfg.proposer_url:
        import os

        proposer = dspy.LM(f"openai/{cfg.proposer_model}", api_base=cfg.proposer_url,
                           api_key=os.environ.get("OPENAI_API_KEY", "none"))
    want = {"metric": metric, "prompt_model": proposer, "reflection_lm": proposer, "max_bootstrapped_demos": cfg.prompt_max_demos, "max_labeled_demos": cfg.prompt_max_demos,
            "num_candidate_programs": cfg.prompt_candidates, "num_threads": max(1, min(cfg.concurrency, 16)),
            "seed": cfg.seed, "auto": "light",
            "max_errors": 1_000_000}  # a reply that does not parse is a failed candidate, not a reason to abort
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in want.items() if k in accepted and v is not None}
