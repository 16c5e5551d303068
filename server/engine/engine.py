"""The serving engine: one base model, a module pool, mixed batches, continuous batching.

Each row of a batch names its own module (or none). A prefill runs new rows together: rows whose
kind brings virtual-token embeddings get them prepended, rows whose kind brings a key/value
prefix start with it in the cache, and the patched linear layers apply each row's per-layer
deltas (see :mod:`tunehub.server.engine.kinds`); rows are left-padded with masked slots. New
rows then join the running batch's cache between decode steps, and finished rows leave it, so
requests come and go without waiting for each other. A request whose module is not in the pool
waits for it on its own: loader threads pull and materialise it while the batch keeps decoding,
and the row joins when it is ready (a module's load is shared by every request waiting for it).

A row whose module brings a tokenizer (a tokenizer module, alone or composed with others) reads
and writes text with that tokenizer and its chat template; its added tokens are embedded from the
module's rows and scored by the module's head rows, beside the base's logits, and the row samples
from the base's tokens and its own module's only (see :mod:`tunehub.server.engine.kinds.tokenizer`).

One request fails only itself. Everything that can be checked is checked at admission (token
ids, sampling parameters; the materialiser checks module tensors at load). A row that still
fails is found and failed alone: sampling is per row, a failed prefill is retried in halves
(new rows are prefilled apart from the running batch), and a failed decode step rewinds the
cache and bisects the batch on copies of it, then steps again without the failing rows.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers.cache_utils import DynamicLayer

from tunehub.devices import use_reusing_cpu_allocator
from tunehub.errors import (  # the engine's errors live in tunehub.errors; imported here under their old names
    ConfigError,
    InvalidRequest,
    NonFiniteLogits,
    PromptTooLong,
    RequestCancelled,
    TunehubError,
    UnsupportedModule,
)
from tunehub.server.engine.base import LoadedBase
from tunehub.server.engine.compose import MAX_CHAIN, Composition, ModuleParts, composition_key, request_parts
from tunehub.server.engine.layers import (
    AdaptedLinear,
    AdaptedNorm,
    BatchState,
    build_plan,
    onednn_linear_works,
    patch_linear_layers,
    patch_norm_layers,
    use_onednn_linears,
)
from tunehub.server.engine.modules import LoadedModule, ModuleMaterializer
from tunehub.server.engine.pool import FolderSource, ModulePool, ModuleSource, NotResident, TokenRanges

log = logging.getLogger("tunehub.engine")


#: temperatures and top_p values below this are treated as their limits (see SamplingParams)
SAMPLING_EPSILON = 1e-5
#: the largest max_tokens accepted (generation stops at the context's end long before)
MAX_TOKENS_LIMIT = 2**31 - 1
_SEED_LIMIT = 2**64  # torch.Generator.manual_seed takes 0 <= seed < 2**64


@dataclass
class SamplingParams:
    """How one request picks its tokens.

    - ``temperature`` below :data:`SAMPLING_EPSILON` (1e-5), 0 included, is greedy decoding:
      logits divided by a temperature that small overflow (1e-300 makes the softmax NaN), and
      the distribution they stand for is the argmax anyway. Larger temperatures sample.
    - ``top_p`` below :data:`SAMPLING_EPSILON` keeps the most likely token only (the nucleus
      always keeps it); top_p must be in (0, 1].
    - NaN and infinite values are refused; ``seed`` must be an integer with
      0 <= seed < 2**64 (what ``torch.Generator.manual_seed`` takes); ``max_tokens`` an integer
      from 1 to :data:`MAX_TOKENS_LIMIT`; ``stop_token_ids`` ids of the base's vocabulary (the
      engine passes its size to :meth:`check`).

    A refused value raises :class:`~tunehub.errors.InvalidRequest` (HTTP 400) naming every
    problem, for that request only."""

    max_tokens: int = 64
    temperature: float = 0.0  # below SAMPLING_EPSILON: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None: the tokenizer's eos

    @property
    def greedy(self) -> bool:
        return self.temperature < SAMPLING_EPSILON

    def check(self, vocab_size: int | None = None) -> None:
        """Refuse values the sampler cannot compute finitely (see the class docstring)."""
        problems = []
        if not _is_int(self.max_tokens) or not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            problems.append(f"max_tokens must be an integer from 1 to {MAX_TOKENS_LIMIT}, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or not 0 <= self.temperature < math.inf:
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            problems.append(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < _SEED_LIMIT):
            problems.append(f"seed must be an integer from 0 to 2**64 - 1, got {self.seed!r}")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            problems.append("stop must be a list of strings")
        if self.stop_token_ids is not None:
            if not isinstance(self.stop_token_ids, (list, tuple, set)):
                problems.append("stop_token_ids must be a list of token ids")
            else:
                bad = _bad_token_ids(self.stop_token_ids, vocab_size)
                if bad:
                    problems.append(f"stop_token_ids must be token ids{_vocab_range(vocab_size)}, got {_preview(bad)}")
        if problems:
            raise InvalidRequest("; ".join(problems))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    # NaN fails every comparison the checks make, so it is refused with the out-of-range values
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bad_token_ids(ids: Any, vocab_size: int | None) -> list[Any]:
    """The entries of ``ids`` that are not ints in [0, vocab_size)."""
    limit = vocab_size if vocab_size is not None else math.inf
    return [t for t in ids if not (_is_int(t) and 0 <= t < limit)]


def _vocab_range(vocab_size: int | None) -> str:
    return f" from 0 to {vocab_size - 1}" if vocab_size is not None else " (integers >= 0)"


def _preview(values: list[Any], limit: int = 5) -> str:
    shown = ", ".join(repr(v) for v in values[:limit])
    return f"{shown}{f' and {len(values) - limit} more' if len(values) > limit else ''}"


@dataclass
class GenerationRequest:
    prompt: str | None = None
    input_ids: list[int] | None = None
    #: a module reference (several joined by '+' are applied together), or None for the base alone
    module: str | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    #: instead of ``module``: references, or (reference, weight) pairs, applied together
    modules: list[str | tuple[str, float]] | None = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    #: instead of ``prompt``: chat messages, rendered with the chat template of the row's tokenizer
    #: (its module's, for a tokenizer module; else the base's)
    messages: list[dict[str, Any]] | None = None


@dataclass
class GenerationResult:
    request_id: str
    text: str
    token_ids: list[int]  # ids of the row's tokenizer (a tokenizer module's ids for its added tokens)
    finish_reason: str  # stop | length | cancelled
    module: str | None  # the exact "repo@version" that answered ("a@1+b@2" for a composition), None for the base
    prompt_tokens: int
    completion_tokens: int


@dataclass
class TokenEvent:
    token_id: int
    text: str  # the text this token adds (may be empty while a stop string could be forming)


class RequestHandle:
    """What ``Engine.submit`` returns: iterate it for tokens, or call ``result()``.

    A request that fails raises its error from both (see :meth:`Engine.submit` for which)."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self.id = request.request_id
        self.module_key: str | None = None
        self._events: queue.Queue = queue.Queue()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._done = threading.Event()
        self.cancelled = False

    def cancel(self) -> None:
        """Ask the engine to stop this request; it never raises. A request still queued fails
        with :class:`~tunehub.errors.RequestCancelled`; a running one finishes at its next
        token with ``finish_reason`` "cancelled" and the text generated so far."""
        self.cancelled = True

    def __iter__(self) -> Iterator[TokenEvent]:
        """The tokens as they are generated (the last event may add text without a token,
        ``token_id`` -1); ends when the request finishes.

        Raises:
            TunehubError: the request failed (the classes :meth:`Engine.submit` lists);
                another exception when a fault of the engine failed it.
        """
        while True:
            kind, payload = self._events.get()
            if kind == "token":
                yield payload
            elif kind == "error":
                raise payload
            else:
                return

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Wait for the request to finish and return its result.

        Args:
            timeout: seconds to wait at most; None waits as long as it takes.

        Returns:
            The text, token ids, finish reason ("stop", "length" or "cancelled"), the exact
            module version that answered and token counts.

        Raises:
            TimeoutError: the request did not finish within ``timeout`` (it keeps running).
            TunehubError: the request failed (the classes :meth:`Engine.submit` lists);
                another exception when a fault of the engine failed it.
        """
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} did not finish in {timeout} s")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    # called by the engine thread
    def _emit(self, event: TokenEvent) -> None:
        self._events.put(("token", event))

    def _finish(self, result: GenerationResult) -> None:
        self._result = result
        self._events.put(("done", result))
        self._done.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._events.put(("error", error))
        self._done.set()


class _Row:
    """A request inside the running batch."""

    def __init__(
        self,
        handle: RequestHandle,
        module: LoadedModule | Composition | None,
        prompt_ids: list[int],
        stop_ids: set[int],
        acquired: list[LoadedModule] | None = None,
    ):
        self.handle = handle
        self.module = module
        #: the module's vocabulary when it brings a tokenizer: the row's ids are then its module ids
        self.vocab: Any = None if module is None else module.vocab
        self.acquired = acquired if acquired is not None else ([module] if isinstance(module, LoadedModule) else [])
        self.prompt_ids = prompt_ids
        self.params = handle.request.params
        self.stop_ids = stop_ids
        self.generated: list[int] = []
        self.emitted_text = ""
        self.next_position = 0
        self.generator = None
        if not self.params.greedy:
            self.generator = torch.Generator().manual_seed(
                self.params.seed if self.params.seed is not None else int(time.time_ns() % (2**63))
            )
        self.finish_reason: str | None = None
        self.final_text = ""  # the row's whole text so far (cut at a stop string), set per token
        self.ready_at = time.monotonic()  # when it could join a batch (its modules in hand)
        self.ready_step = 0  # the engine's decode step count then (set by the engine)

    @property
    def steps_left(self) -> int:
        """Decode steps until ``max_tokens`` ends the row (a stop may end it sooner)."""
        return self.params.max_tokens - len(self.generated)


class Engine:
    """Serve many modules from one base. Thread-safe ``submit``; one background decode loop.

    Modules come from ``source`` (a registry store) through :attr:`pool` (``engine.pool``
    loads, pins and unloads them); each request names its own module, and requests for
    different modules share batches. A request that fails fails alone (see the module
    docstring); :meth:`RequestHandle.cancel` stops one."""

    def __init__(
        self,
        base: LoadedBase,
        source: ModuleSource | FolderSource | None = None,
        *,
        pool_bytes: int = 1 << 30,
        max_batch: int = 16,
        max_rank: int = 256,
        alias_ttl_s: float = 5.0,
        gather_s: float = 0.002,
        join_wait_s: float = 0.05,
        join_steps: int = 8,
        cpu_allocator: Literal["auto", "reuse", "default"] = "default",
        cpu_linear: Literal["auto", "onednn", "default"] = "auto",
        loader_threads: int = 2,
        max_added_tokens: int = 1 << 16,
    ):
        """``gather_s``: when the engine is idle and a request arrives, how long it waits for
        more to start them in the same prefill (requests sent together then share batches).
        ``cpu_allocator``: "reuse" (what "auto" picks for a base on the CPU) makes glibc keep
        freed memory for the next decode step and the next module instead of faulting in fresh
        pages (:func:`tunehub.devices.use_reusing_cpu_allocator`; it applies to the whole
        process); "default" (the default: constructing an engine changes nothing process-wide)
        leaves the allocator alone. The serve entry point passes "auto".
        ``cpu_linear``: "onednn" (what "auto" picks where this torch build has it) serves the
        base's fp32 linear layers on the CPU (of a 4-bit base: its LM head) through oneDNN, each
        weight reordered once at load (:class:`~tunehub.server.engine.layers.OneDNNLinear`); "default" keeps
        torch's linear. Engines built on one loaded base share its layers: the first decides.
        ``join_wait_s``: while a batch runs, rows ready to join it wait up to this long for
        others to join with them, until a quarter of the batch (at least 2) can join at once:
        a prefill reads every weight once, whether it is for one row or several, and every
        running row waits for it. When nothing runs, ready rows wait as long for rows whose
        modules are loading, to start with them. 0 joins each row as soon as it is ready.
        ``join_steps``: while a running row will end within this many decode steps, or a module
        is loading, ready rows wait for them (this many steps at most): a slot frees, the next
        request of that row's client or the loading row can join in the same prefill. Rows that
        module loads have set apart start together again, so a stream over many modules runs
        about as few prefills as one over a single module (``benchmarks/scale.py``); the price
        is up to this many steps of time to first token. 0: ready rows join at once.
        ``loader_threads``: how many modules load at once, off the decode loop (a request whose
        module is in the pool never waits for them).
        ``max_added_tokens``: the engine ids beyond the base's vocabulary that tokenizer modules'
        added tokens share (each loaded module holds a range of its own; a module that finds no
        room evicts unused ones or fails with :class:`~tunehub.errors.VocabularyFull`).

        Args:
            base: the loaded base model (:func:`~tunehub.server.engine.load_base`); its linear
                layers are patched in place to apply each row's module.
            source: where modules come from (a registry store: ``resolve`` and ``read``, or
                ``resolve`` and ``pull``). None: only the base answers, and a request naming a
                module fails with :class:`~tunehub.errors.ModuleNotFound`.
            pool_bytes: the module pool's budget; modules not in use are evicted over it.
            max_batch: the most requests decoded together.
            max_rank: the largest rank of a low-rank module (LoRA, DoRA, AdaLoRA) it serves.
            alias_ttl_s: how long an alias or ``latest`` stays resolved before it is looked up
                again (a promotion takes effect after at most this).
            gather_s, join_wait_s, join_steps, cpu_allocator, cpu_linear, loader_threads, max_added_tokens: as above.

        Raises:
            ConfigError: ``cpu_allocator`` or ``cpu_linear`` is not one of its values,
                ``cpu_linear="onednn"`` where this torch build has no working oneDNN linear,
                ``loader_threads`` below 1, or ``join_steps`` or ``max_added_tokens`` below 0.
        """
        if loader_threads < 1:
            raise ConfigError(f"loader_threads must be at least 1, not {loader_threads}")
        if not isinstance(join_steps, int) or join_steps < 0:
            raise ConfigError(f"join_steps must be an integer >= 0, not {join_steps!r}")
        if not isinstance(max_added_tokens, int) or max_added_tokens < 0:
            raise ConfigError(f"max_added_tokens must be an integer >= 0, not {max_added_tokens!r}")
        if cpu_allocator not in ("auto", "reuse", "default"):
            raise ConfigError(f"cpu_allocator must be auto, reuse or default, not {cpu_allocator!r}")
        if cpu_linear not in ("auto", "onednn", "default"):
            raise ConfigError(f"cpu_linear must be auto, onednn or default, not {cpu_linear!r}")
        if cpu_linear == "onednn" and not onednn_linear_works():
            raise ConfigError("cpu_linear='onednn': this torch build has no working oneDNN linear (use auto or default)")
        if cpu_allocator == "reuse" or (cpu_allocator == "auto" and base.device.type == "cpu"):
            use_reusing_cpu_allocator()
        self.base = base
        self.model = base.model
        self.tokenizer = base.tokenizer
        self.max_batch = max_batch
        # the patched layers live on the model: engines built on one loaded base share them, and
        # share the lock that keeps their forward passes (each sets the batch's plan) apart
        shared: tuple[BatchState, dict[str, AdaptedLinear], dict[str, AdaptedNorm], threading.Lock] | None = getattr(
            self.model, "_tunehub_adapted", None
        )
        if shared is None:
            state = BatchState()
            if cpu_linear != "default" and onednn_linear_works():
                use_onednn_linears(self.model)  # fp32 CPU nn.Linear only (of a 4-bit base: its LM head)
            linears = patch_linear_layers(self.model, state)
            shared = (state, linears, patch_norm_layers(self.model, state), threading.Lock())
            self.model._tunehub_adapted = shared
        self.state, self.layers, self.norms, self._lock = shared
        self._plan_layers: dict[str, AdaptedLinear | AdaptedNorm] = {**self.layers, **self.norms}
        self.materializer = ModuleMaterializer(base, self.layers, max_rank=max_rank, norm_layers=self.norms)
        # ids must index the input embedding (the LM head may be padded wider)
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        head = self.model.get_output_embeddings()
        head_width = int(getattr(head, "out_features", 0) or 0) if head is not None else 0
        # tokenizer modules' added tokens get engine ids past every id the base has
        self.added_ids_start = max(self.vocab_size, head_width)
        self._plans: OrderedDict[tuple, dict] = OrderedDict()
        # compositions by their members (uid, weight): one object per distinct composition, so
        # that rows composing the same modules share plans (under the plans' lock)
        self._compositions: OrderedDict[tuple, Composition] = OrderedDict()
        # the plans hold copies of their modules' tensors: a module that leaves the pool takes
        # its plans with it (the pool calls this from any thread, so the plans have their own lock)
        self._plans_lock = threading.Lock()
        self.pool = ModulePool(
            source or _NoSource(),
            self.materializer.load,
            check=self.materializer.admit,
            budget_bytes=pool_bytes,
            alias_ttl_s=alias_ttl_s,
            on_drop=self._forget_plans,
            token_ids=TokenRanges(self.added_ids_start, max_added_tokens),
            files=self.materializer.files_to_read(),
        )
        # the added tokens' head rows of the last batch with tokenizer rows: (vocabularies, rows, columns)
        self._added_head: tuple[tuple[Any, ...], torch.Tensor, dict[int, int]] | None = None
        self._head_input: torch.Tensor | None = (
            None  # what the LM head read in the last forward that asked        # submitted requests, the rows prepared for them (modules acquired) that wait for room in
        )
        # the batch, and how many the loaders are preparing; guarded by _wake, which the loop
        # waits on when it has nothing to do
        self._inbox: deque[RequestHandle] = deque()
        self._ready: deque[_Row] = deque()
        self._loading = 0
        self._wake = threading.Condition()
        self.loader_threads = loader_threads
        self._loader: ThreadPoolExecutor | None = None
        self._rows: list[_Row] = []
        self._cache: Any = None  # the running batch's key/value cache (growing layers)
        self._mask: torch.Tensor | None = None
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()  # never held during a forward: submit() must not wait for one
        self._stop = threading.Event()
        self.gather_s = gather_s
        self.join_wait_s = join_wait_s
        self.join_steps = join_steps
        self.steps = 0
        eos = self.tokenizer.eos_token_id
        self.default_stop_ids = {eos} if eos is not None else set()

    # --- public API ----------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue ``request``; its sampling parameters are checked here (InvalidRequest).

        Everything else is checked when the engine admits the request, and a request that
        fails then, or later, fails alone: its handle raises the error (``result()`` or
        iterating it). It fails with InvalidRequest (no prompt, bad or empty ``input_ids``),
        PromptTooLong, RequestCancelled (cancelled while queued), NonFiniteLogits (a sampled
        row whose logits are not finite); for its module with InvalidReference,
        ModuleNotFound (VersionNotFound, AliasNotFound), IncompatibleBase (trained for another
        base or tokenizer), UnsupportedModule, InvalidModuleWeights, or what the source raises
        reading it (IntegrityError, ManifestError, StoreError).

        Args:
            request: the prompt (text or token ids), the module reference (None: the base
                alone) and the sampling parameters.

        Returns:
            The request's handle: iterate it for tokens, or call ``result()``.

        Raises:
            InvalidRequest: a sampling parameter is out of range (nothing is queued then).
        """
        request.params.check(self.vocab_size)
        handle = RequestHandle(request)
        with self._wake:
            self._inbox.append(handle)
            self._wake.notify()
        self._ensure_thread()
        return handle

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run ``requests`` together and wait for all of them (a blocking :meth:`submit`).

        Args:
            requests: the requests; they are batched with each other and with running ones.

        Returns:
            Their results, in the order of ``requests``.

        Raises:
            InvalidRequest: a request's sampling parameters are out of range (the requests
                before it were queued and still run).
            TunehubError: the first failed request's error, in order (the classes
                :meth:`submit` lists; another exception when a fault of the engine failed
                it); the other requests still finish.
        """
        handles = [self.submit(r) for r in requests]
        return [h.result() for h in handles]

    def close(self) -> None:
        """Stop the decode loop after its current step (waits up to 10 s for it). Never raises.
        Requests queued or running are not answered until a later :meth:`submit` starts the
        loop again."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._thread_lock:
            if self._loader is not None:  # a load under way finishes; its row waits for a later loop
                self._loader.shutdown(wait=False)
                self._loader = None

    @torch.no_grad()
    def logits(self, rows: list[tuple[list[int], str | list[str | tuple[str, float]] | None]]) -> list[torch.Tensor]:
        """Prefill logits of each row's own tokens (virtual tokens excluded), all rows in one pass.

        Runs in the caller's thread (between decode steps of the loop), for tests and scoring.

        Args:
            rows: (token ids, modules) per row: a module reference (several joined by '+'), a list
                of references or (reference, weight) pairs, or None for the base.

        Returns:
            Per row, float32 logits of shape (len(ids), the LM head's vocabulary); a row whose
            module brings a tokenizer gets its module's vocabulary (base tokens, then its own).

        Raises:
            InvalidRequest: ids that are empty or not token ids of the base's vocabulary.
            InvalidReference, ModuleNotFound, IncompatibleBase, UnsupportedModule,
            InvalidModuleWeights, IntegrityError, ManifestError, StoreError: a row's module
                cannot be loaded (as for :meth:`submit`).
        """
        modules: list[LoadedModule | Composition | None] = []
        acquired: list[LoadedModule] = []
        try:
            for _, ref in rows:
                parts = request_parts(None, ref) if isinstance(ref, list) else request_parts(ref or None, None)
                module, held = self._acquire(parts)
                modules.append(module)
                acquired.extend(held)
            prompts = [self._checked_ids(ids, None if m is None else m.vocab) for (ids, _), m in zip(rows, modules, strict=True)]
            with self._lock:
                out, layout, _, added = self._prefill_forward(prompts, modules, keep_all=True)
            result = []
            for i, (ids, _) in enumerate(rows):
                start = layout[i]
                logits = out.logits[i, start : start + len(ids)].float()
                module = modules[i]
                vocab = None if module is None else module.vocab
                if vocab is not None and added is not None:  # the row's view: base tokens, then its module's own
                    logits = added.row_view(logits, i, vocab, slice(start, start + len(ids)))
                result.append(logits.clone())
            return result
        finally:
            self._release_all(acquired)

    # --- the loop ------------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._thread_lock:
            if self._loader is None:
                self._loader = ThreadPoolExecutor(self.loader_threads, thread_name_prefix="tunehub-loader")
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._loop, name="tunehub-engine", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            new = self._take_rows(block=not self._rows)
            try:
                with self._lock, torch.no_grad():
                    if new:
                        self._prefill_and_join(new)
                    if self._rows:
                        self._decode_step()
            except Exception as exc:
                # a fault no single row explains (each row alone succeeded): it fails the rows in
                # flight, never the process
                log.exception("engine step failed")
                for row in self._rows:
                    self._fail_row(row, exc)
                self._rows, self._cache, self._mask = [], None, None

    @property
    def waiting(self) -> dict[str, int]:
        """Requests not yet in the batch: ``queued`` (not looked at yet), ``loading`` (their
        modules are being loaded), ``ready`` (loaded, waiting for room in the batch)."""
        with self._wake:
            return {"queued": len(self._inbox), "loading": self._loading, "ready": len(self._ready)}

    def _take_rows(self, block: bool) -> list[_Row]:
        """Rows to prefill now, at most the batch's room. Requests whose modules are all in the
        pool become rows here at once; the others go to the loaders and come back as rows
        when their modules are loaded. ``block`` (nothing is running): wait for a first row,
        then ``gather_s`` for more to start with it."""
        with self._wake:
            if block:
                while not (self._inbox or self._ready) and not self._stop.is_set():
                    self._wake.wait()
                deadline = time.monotonic() + self.gather_s
                while (
                    len(self._inbox) + len(self._ready) < self.max_batch
                    and (left := deadline - time.monotonic()) > 0
                    and not self._stop.is_set()
                ):
                    self._wake.wait(left)
            # at most max_batch rows wait prepared (their modules held in the pool) beside the batch
            look = max(0, min(len(self._inbox), self.max_batch - len(self._ready) - self._loading))
            handles = [self._inbox.popleft() for _ in range(look)]
        prepared = [row for row in (self._prepare(handle) for handle in handles) if row is not None]
        room = self.max_batch - len(self._rows)
        with self._wake:
            self._ready.extend(prepared)
            while not self._rows and self._loading and self._ready and len(self._ready) < room and not self._stop.is_set():
                # nothing runs: rows whose modules are loading (or whose alias is looked up again)
                # may be ready soon, and then start in the same prefill (join_wait_s at most)
                left = self._ready[0].ready_at + self.join_wait_s - time.monotonic()
                if left <= 0:
                    break
                self._wake.wait(left)
            joining = min(room, len(self._ready))
            if self._rows and joining and joining < max(2, self.max_batch // 4):
                # a few rows only: they wait (join_wait_s at most) for more to join with, leaving
                # a slot empty meanwhile: a row decodes one token per step, a prefill stalls all
                if time.monotonic() - self._ready[0].ready_at < self.join_wait_s:
                    joining = 0
            if (
                self._rows  # (an idle engine waits for loading rows join_wait_s at most, above)
                and joining
                and joining < room
                and self.steps - self._ready[0].ready_step < self.join_steps
                and (self._loading or any(row.steps_left <= self.join_steps for row in self._rows))
            ):
                # a module is loading, or a running row ends within join_steps: wait for them (its
                # client's next request may take the slot it frees), to join in one prefill
                joining = 0
            taken = [self._ready.popleft() for _ in range(joining)]
        rows = []
        for row in taken:
            if row.handle.cancelled:
                self._release(row)
                row.handle._fail(RequestCancelled(f"request {row.handle.id} was cancelled"))
            else:
                rows.append(row)
        return rows

    def _prepare(self, handle: RequestHandle) -> _Row | None:
        """The row for ``handle`` if its modules are in the pool; else None, and the loaders
        prepare it (a request that cannot be served fails here, alone)."""
        if handle.cancelled:
            handle._fail(RequestCancelled(f"request {handle.id} was cancelled"))
            return None
        try:
            return self._make_row(handle, load=False)
        except NotResident:
            with self._thread_lock, self._wake:
                loader = self._loader
                if loader is None:  # closed meanwhile: back to the queue, for the next loop
                    self._inbox.appendleft(handle)
                    return None
                self._loading += 1
                loader.submit(self._load_row, handle)
        except Exception as exc:  # noqa: BLE001 - a bad module or prompt fails this request only
            handle._fail(exc)
        return None

    def _load_row(self, handle: RequestHandle) -> None:
        """On a loader thread: load ``handle``'s modules, and queue its row for the batch."""
        row = None
        try:
            if handle.cancelled:
                raise RequestCancelled(f"request {handle.id} was cancelled")
            row = self._make_row(handle, load=True)
        except BaseException as exc:  # noqa: BLE001 - whatever it is, it is this request's
            handle._fail(exc)
        with self._wake:
            self._loading -= 1
            if row is not None:
                self._ready.append(row)
            self._wake.notify()

    def _admit(self, handles: list[RequestHandle]) -> None:
        """Prefill ``handles`` into the batch now, loading their modules in this thread (for
        callers that hold the engine's lock and want the rows in, e.g. a profiler)."""
        rows: list[_Row] = []
        for handle in handles:
            if handle.cancelled:
                handle._fail(RequestCancelled(f"request {handle.id} was cancelled"))
                continue
            try:
                rows.append(self._make_row(handle))
            except Exception as exc:  # noqa: BLE001 - a bad module or prompt fails this request only
                handle._fail(exc)
        if rows:
            self._prefill_and_join(rows)

    def _prefill_and_join(self, rows: list[_Row]) -> None:
        """Prefill ``rows`` and add them to the running batch. The prefill builds a cache of its
        own, so a failed one leaves the running batch untouched: the rows are tried again in
        halves, down to the failing rows, which fail alone with their own errors; the others
        join as they would have alone (rows never depend on each other)."""
        try:
            out, _, mask, added = self._prefill_forward([r.prompt_ids for r in rows], [r.module for r in rows], rows=rows)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the rows are tried apart
            if len(rows) == 1:
                self._fail_row(rows[0], exc, during="prefill")
                return
            half = len(rows) // 2
            self._prefill_and_join(rows[:half])
            self._prefill_and_join(rows[half:])
            return
        new_kv = [(layer.keys, layer.values) for layer in out.cache.layers]
        self._merge(rows, new_kv, mask)
        self._sample_and_emit(out.logits[:, -1, :], rows, added)

    def _make_row(self, handle: RequestHandle, load: bool = True) -> _Row:
        request = handle.request
        module, acquired = self._acquire(request_parts(request.module, request.modules), load=load)
        try:
            vocab = None if module is None else module.vocab
            tokenizer = self.tokenizer if vocab is None else vocab.tokenizer  # the row's text in and out
            if request.input_ids is not None:
                ids = request.input_ids
            elif request.messages is not None:
                owner = f"the base {self.base.name}" if module is None or vocab is None else f"the tokenizer of {module.key}"
                ids = chat_ids(tokenizer, request.messages, owner)
            elif isinstance(request.prompt, str):
                ids = tokenizer(request.prompt, add_special_tokens=True)["input_ids"]
            else:
                raise InvalidRequest("a request needs a prompt (a string), messages or input_ids")
            ids = self._checked_ids(ids, vocab)  # the tokenizer's too: a tokenizer may know more ids than the embedding
            virtual = module.num_virtual_tokens if module else 0
            if len(ids) + virtual >= self.base.max_positions:
                raise PromptTooLong(
                    f"the prompt has {len(ids)} tokens{f' plus {virtual} virtual' if virtual else ''};"
                    f" the context holds {self.base.max_positions}"
                )
        except BaseException:
            self._release_all(acquired)
            raise
        handle.module_key = module.key if module else None
        if request.params.stop_token_ids is not None:
            stop_ids = set(request.params.stop_token_ids)
        elif vocab is not None:
            stop_ids = {vocab.tokenizer.eos_token_id} if vocab.tokenizer.eos_token_id is not None else set()
        else:
            stop_ids = set(self.default_stop_ids)
        row = _Row(handle, module, ids, stop_ids, acquired)
        row.ready_step = self.steps
        return row

    # --- modules of a row: one, a composition, a chain ---------------------------------------------
    def _acquire(self, parts: ModuleParts, load: bool = True) -> tuple[LoadedModule | Composition | None, list[LoadedModule]]:
        """What a row applies for ``parts`` (see :func:`~tunehub.server.engine.compose.request_parts`),
        and every module it acquired from the pool (to release when the row ends): None for the
        base; the module itself when one module without a parent is named at weight 1; else a
        :class:`Composition` of the named modules with their ancestors, ancestors first.

        Raises what ``pool.acquire`` raises (the message names the child when a parent cannot be
        loaded), UnsupportedModule for modules that cannot be applied together or a chain that
        loops or is longer than MAX_CHAIN, InvalidRequest for a module named twice with two weights;
        with ``load=False``, NotResident when a module or an ancestor is not in the pool (nothing
        stays acquired then)."""
        if not parts:
            return None, []
        acquired: list[LoadedModule] = []
        try:
            members: list[tuple[LoadedModule, float]] = []
            named: list[tuple[LoadedModule, float]] = []  # what the request named: the answer's key
            for ref, weight in parts:
                module = self.pool.acquire(ref, load=load)
                acquired.append(module)
                if any(m.key == module.key for m, _ in named):
                    raise InvalidRequest(f"{module.key} is named twice in this request (give it one weight instead)")
                named.append((module, weight))
                for link in self._chain(module, acquired, load):
                    link_weight = weight if link is module else 1.0  # ancestors apply as the child was trained on them
                    same = [w for m, w in members if m.key == link.key]
                    if same and same[0] != link_weight:  # a named module that is another's parent too
                        raise InvalidRequest(
                            f"{link.key} is applied twice in this request (named, and as a parent), with weights"
                            f" {same[0]:g} and {link_weight:g}"
                        )
                    if not same:
                        members.append((link, link_weight))
            if len(members) == 1 and members[0][1] == 1.0:
                return members[0][0], acquired
            return self._composition(members, composition_key(named)), acquired
        except BaseException:
            self._release_all(acquired)
            raise

    def _chain(self, module: LoadedModule, acquired: list[LoadedModule], load: bool = True) -> list[LoadedModule]:
        """``module`` and its ancestors (``manifest.parent``, each an exact version) in the order
        the trainer ran them (``init.parent``): the module itself, then the root, ..., the direct
        parent, as PEFT's active adapters were ordered (it matters for DoRA, whose gain scales
        what came before it). Each ancestor is acquired (and appended to ``acquired``)."""
        chain = [module]
        parent = module.manifest.parent
        while parent:
            if len(chain) > MAX_CHAIN:
                raise UnsupportedModule(f"{module.key}: its chain of parents is longer than {MAX_CHAIN}")
            try:
                ancestor = self.pool.acquire(parent, load=load)
            except TunehubError as exc:  # the same error (and status), saying whose parent it is
                try:
                    named = type(exc)(f"{module.key} was trained on top of {parent}, which cannot be applied: {exc}")
                except TypeError:  # an error class with other arguments: as it is
                    raise exc from None
                raise named from None
            acquired.append(ancestor)
            if any(link.key == ancestor.key for link in chain):
                raise UnsupportedModule(f"{module.key}: its chain of parents loops at {ancestor.key}")
            chain.append(ancestor)
            parent = ancestor.manifest.parent
        return [module, *chain[:0:-1]]

    def _composition(self, members: list[tuple[LoadedModule, float]], answer_key: str) -> Composition:
        """The composition of ``members`` (one object per distinct one; ``answer_key``: what
        responses report, the modules the request named with their versions)."""
        key = (answer_key, *((m.uid, w) for m, w in members))
        with self._plans_lock:
            found = self._compositions.get(key)
            if found is not None:
                self._compositions.move_to_end(key)
                return found
        composition = Composition(members, self.materializer.next_uid(), answer_key)
        with self._plans_lock:
            found = self._compositions.setdefault(key, composition)
            self._compositions.move_to_end(key)
            while len(self._compositions) > 64:
                _, dropped = self._compositions.popitem(last=False)
                self._drop_plans_with(dropped.uid)
        return found

    def _release_all(self, modules: list[LoadedModule]) -> None:
        for module in modules:
            self.pool.release(module)

    def _checked_ids(self, ids: Any, vocab: Any = None) -> list[int]:
        """``ids`` if every one indexes the embedding (of a tokenizer module's row: is a base
        token or one of its module's); an id outside it would fail the shared prefill of every
        row batched with it."""
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise InvalidRequest("input_ids must be a list of token ids")
        ids = list(ids)
        if not ids:
            raise InvalidRequest("the prompt is empty")
        size = self.vocab_size if vocab is None else vocab.size
        bad = _bad_token_ids(ids, size)
        if bad:
            raise InvalidRequest(f"input_ids must be token ids{_vocab_range(size)}, got {_preview(bad)}")
        return ids

    # --- forward passes ------------------------------------------------------------------------
    def _plan_for(self, modules: list[LoadedModule | Composition | None]) -> dict:
        key = tuple(m.uid if m is not None else 0 for m in modules)
        with self._plans_lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        # the batch holds its modules (acquired), so none of them leaves the pool meanwhile
        plan = build_plan(modules, self._plan_layers, self.base.device, self.base.dtype)
        with self._plans_lock:
            self._plans[key] = plan
            while len(self._plans) > 16:  # keep a few compositions
                self._plans.popitem(last=False)
        return plan

    def _forget_plans(self, module: LoadedModule) -> None:
        """Drop every plan and composition built with ``module``: it left the pool, and must
        leave no memory behind (a plan holds copies or views of its tensors)."""
        with self._plans_lock:
            for key in [k for k, c in self._compositions.items() if module in c]:
                self._drop_plans_with(self._compositions.pop(key).uid)
            self._drop_plans_with(module.uid)
            if self._added_head is not None and any(v is module.vocab for v in self._added_head[0]):
                self._added_head = None

    def _drop_plans_with(self, uid: int) -> None:
        """Drop the plans of batches that had a row with ``uid`` (under the plans' lock)."""
        for key in [k for k in self._plans if uid in k]:
            del self._plans[key]

    def _prefill_forward(
        self,
        prompts: list[list[int]],
        modules: list[LoadedModule | Composition | None],
        *,
        keep_all: bool = False,
        rows: list[_Row] | None = None,
    ):
        from transformers import DynamicCache

        device, dtype = self.base.device, self.base.dtype
        embed = self.model.get_input_embeddings()
        batch = len(prompts)
        # the kinds' prefill hooks: embeddings before a row's tokens, key/value prefixes in its cache
        virtual_embeds = [None if m is None else m.virtual_embeddings() for m in modules]
        prefixes = [None if m is None else m.cache_prefix() for m in modules]
        virtual = [0 if e is None else int(e.shape[0]) for e in virtual_embeds]
        prefix = [int(p[0][0].shape[1]) if p else 0 for p in prefixes]
        lengths = [v + len(p) for v, p in zip(virtual, prompts, strict=True)]
        width = max(lengths)
        prefix_width = max(prefix)
        hidden = embed.weight.shape[1]
        embeds = torch.zeros(batch, width, hidden, dtype=dtype, device=device)
        positions = torch.zeros(batch, width, dtype=torch.long, device=device)
        mask = torch.zeros(batch, prefix_width + width, dtype=torch.long, device=device)
        starts = []
        vocabs = [None if m is None else m.vocab for m in modules]
        for i, ids in enumerate(prompts):
            pad = width - lengths[i]
            vocab = vocabs[i]
            if vocab is None:
                tokens = embed(torch.tensor(ids, device=device)).to(dtype)
            else:  # its module's added tokens come from the module's rows
                tokens = vocab.embed(ids, embed, device, dtype)
            row_embeds = virtual_embeds[i]
            if row_embeds is not None and virtual[i]:
                embeds[i, pad : pad + virtual[i]] = row_embeds.to(device=device, dtype=dtype)
            embeds[i, pad + virtual[i] :] = tokens
            # PEFT runs prefix rows with the prefix as cache, so their tokens start at position p
            positions[i, pad:] = torch.arange(prefix[i], prefix[i] + lengths[i], device=device)
            mask[i, prefix_width - prefix[i] : prefix_width] = 1
            mask[i, prefix_width + pad :] = 1
            starts.append(pad + virtual[i])
            if rows is not None:
                rows[i].next_position = prefix[i] + lengths[i]
        cache = DynamicCache()
        if prefix_width:
            cache = DynamicCache(ddp_cache_data=self._prefix_cache(prefixes, prefix, prefix_width))
        self.state.layers = self._plan_for(modules)
        hook = self._watch_head(vocabs)
        try:
            out = self.model(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=0 if keep_all else 1,
            )
        finally:
            self.state.layers = {}
            if hook is not None:
                hook.remove()
        return out, starts, mask, self._added_logits(vocabs)

    def _watch_head(self, vocabs: list[Any]) -> Any:
        """When a row brings a tokenizer, keep what the LM head reads in the next forward (the
        final hidden states its added tokens are scored on); returns the hook to remove, or None."""
        if all(v is None for v in vocabs):
            return None
        self._head_input = None
        head = self.model.get_output_embeddings()
        if head is None:
            raise UnsupportedModule(f"the base {self.base.name} has no output head to score added tokens with")

        def keep(module: Any, args: tuple[Any, ...], output: Any) -> None:
            self._head_input = args[0]

        return head.register_forward_hook(keep)

    def _added_logits(self, vocabs: list[Any]) -> _AddedLogits | None:
        """The logits of the added tokens of the batch's tokenizer modules (after a forward
        :meth:`_watch_head` watched), or None when no row brings a tokenizer."""
        if all(v is None for v in vocabs):
            return None
        hidden = self._head_input
        self._head_input = None
        if hidden is None:
            raise RuntimeError("the LM head was not called in this forward")
        distinct = tuple(sorted({id(v): v for v in vocabs if v is not None}.values(), key=lambda v: v.first_id))
        with self._plans_lock:
            cached = self._added_head
            if (
                cached is None
                or len(cached[0]) != len(distinct)
                or any(a is not b for a, b in zip(cached[0], distinct, strict=True))
            ):
                # the columns are the modules' engine id ranges side by side, in id order
                rows = distinct[0].head_rows if len(distinct) == 1 else torch.cat([v.head_rows for v in distinct])
                columns, start = {}, 0
                for vocab in distinct:
                    columns[id(vocab)] = start
                    start += vocab.added
                cached = self._added_head = (distinct, rows, columns)
        _, rows, columns = cached
        logits = hidden.float() @ rows.t()
        cap = getattr(self.model.config, "final_logit_softcapping", None)
        if cap:  # as the base's head does to its own logits
            logits = torch.tanh(logits / cap) * cap
        return _AddedLogits(logits, columns)

    def _prefix_cache(
        self, prefixes: list[list[tuple[torch.Tensor, torch.Tensor]] | None], prefix: list[int], width: int
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The batch's starting cache: row i's key/value prefix (``prefixes[i]``, ``prefix[i]``
        slots) right-aligned in ``width`` slots per layer, zeros (masked) elsewhere."""
        config = self.model.config
        kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        batch = len(prefixes)
        device, dtype = self.base.device, self.base.dtype
        layers = []
        for layer in range(config.num_hidden_layers):
            keys = torch.zeros(batch, kv_heads, width, head_dim, dtype=dtype, device=device)
            values = torch.zeros_like(keys)
            for i, row_prefix in enumerate(prefixes):
                if row_prefix is not None and prefix[i]:
                    k, v = row_prefix[layer]
                    keys[i, :, width - prefix[i] :] = k.to(device=device, dtype=dtype)
                    values[i, :, width - prefix[i] :] = v.to(device=device, dtype=dtype)
            layers.append((keys, values))
        return layers

    def _decode_forward(
        self, rows: list[_Row], cache: Any, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, _AddedLogits | None]:
        """One decode step of ``rows`` on ``cache`` (written in place): (last logits, new mask,
        the added tokens' logits when a row's module brings a tokenizer)."""
        device = self.base.device
        positions = torch.tensor([[r.next_position] for r in rows], device=device)
        mask = torch.cat([mask, torch.ones(len(rows), 1, dtype=torch.long, device=device)], dim=1)
        vocabs = [r.vocab for r in rows]
        inputs: dict[str, torch.Tensor]
        if any(v is not None and r.generated[-1] >= v.base_vocab for r, v in zip(rows, vocabs, strict=True)):
            # a row's last token is one of its module's own: embedded from the module's rows
            embed = self.model.get_input_embeddings()
            dtype = self.base.dtype
            inputs = {
                "inputs_embeds": torch.stack(
                    [
                        embed(torch.tensor([r.generated[-1]], device=device)).to(dtype)
                        if v is None
                        else v.embed([r.generated[-1]], embed, device, dtype)
                        for r, v in zip(rows, vocabs, strict=True)
                    ]
                )
            }
        else:
            inputs = {"input_ids": torch.tensor([[r.generated[-1]] for r in rows], device=device)}
        self.state.layers = self._plan_for([r.module for r in rows])
        hook = self._watch_head(vocabs)
        try:
            # the cache's layers write the new keys and values in place (no copy of the cache)
            out = self.model(**inputs, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        finally:
            self.state.layers = {}
            if hook is not None:
                hook.remove()
        return out.logits[:, -1, :], mask, self._added_logits(vocabs)

    def _decode_step(self, *, isolate: bool = True) -> None:
        rows = self._rows
        length = self._cache.layers[0].get_seq_length()
        try:
            logits, self._mask, added = self._decode_forward(rows, self._cache, self._running_mask())
        except Exception as exc:  # re-raised unless a row explains it
            # the layers the failed step reached wrote one slot past ``length``: forget it
            for layer in self._cache.layers:
                layer.truncate(length)
            if not isolate:
                raise
            culprits = self._decode_culprits(list(range(len(rows))), exc)
            if not culprits:
                raise  # no row fails alone: a fault of the batch as a whole
            for index, error in culprits:
                self._fail_row(rows[index], error, during="decode")
            self._retire([index for index, _ in culprits])
            if self._rows:
                self._decode_step(isolate=False)
            return
        for row in rows:
            row.next_position += 1
        self.steps += 1
        self._sample_and_emit(logits, rows, added)

    def _decode_culprits(self, indices: list[int], error: BaseException | None = None) -> list[tuple[int, BaseException]]:
        """The rows (of ``indices`` into the running batch) whose decode step fails on their own,
        with their errors. ``error``: the step of all of ``indices`` already failed with it.
        Halves are tried on copies of their cache, so the running batch stays as it was."""
        if error is None:
            rows = [self._rows[i] for i in indices]
            index = torch.tensor(indices, device=self.base.device)
            kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in _cache_tensors(self._cache)]
            try:
                self._decode_forward(rows, _growing_cache(kv, 1), self._running_mask().index_select(0, index))
                return []
            except Exception as exc:  # noqa: BLE001 - any failure marks the group
                error = exc
        if len(indices) == 1:
            return [(indices[0], error)]
        half = len(indices) // 2
        return self._decode_culprits(indices[:half]) + self._decode_culprits(indices[half:])

    # --- batch bookkeeping ---------------------------------------------------------------------
    def _merge(self, rows: list[_Row], kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        if not self._rows:
            self._rows, self._mask = list(rows), mask
            self._cache = _growing_cache(kv, self._room())
            return
        running = self._running_mask()
        old_len, new_len = running.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        old_kv, old_mask = _left_pad(_cache_tensors(self._cache), running, width)
        new_kv, new_mask = _left_pad(kv, mask, width)
        self._mask = torch.cat([old_mask, new_mask])
        self._rows = self._rows + list(rows)
        self._cache = _growing_cache(
            [(torch.cat([ok, nk]), torch.cat([ov, nv])) for (ok, ov), (nk, nv) in zip(old_kv, new_kv, strict=True)], self._room()
        )

    def _running_mask(self) -> torch.Tensor:
        """The running batch's attention mask: set whenever rows run."""
        if self._mask is None:
            raise RuntimeError("the engine has rows but no attention mask")
        return self._mask

    def _room(self) -> int:
        """Cache slots to reserve past the current length: what the rows may still generate,
        at most 256 at a time (layers grow by doubling when a batch runs longer)."""
        left = max((r.params.max_tokens - len(r.generated) for r in self._rows), default=1)
        return max(1, min(left, 256))

    def _retire(self, finished: list[int]) -> None:
        if not finished:
            return
        keep = [i for i in range(len(self._rows)) if i not in set(finished)]
        if not keep:
            self._rows, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.base.device)
        mask = self._running_mask().index_select(0, index)
        # drop leading columns no remaining row attends to, so the cache does not grow forever
        used = mask.any(dim=0).nonzero()
        first = int(used[0]) if len(used) else 0
        self._mask = mask[:, first:]
        kv = [
            (k.index_select(0, index)[:, :, first:], v.index_select(0, index)[:, :, first:])
            for k, v in _cache_tensors(self._cache)
        ]
        self._rows = [self._rows[i] for i in keep]
        self._cache = _growing_cache(kv, self._room())

    def _release(self, row: _Row) -> None:
        self._release_all(row.acquired)
        row.acquired = []
        row.module = None

    def _fail_row(self, row: _Row, error: BaseException, during: str | None = None) -> None:
        """End one row's request with ``error`` (the batch it leaves is the caller's business)."""
        if during is not None and not (isinstance(error, TunehubError) and error.http_status < 500):
            log.warning("request %s failed alone in a %s step (the other rows go on): %r", row.handle.id, during, error)
        self._release(row)
        row.handle._fail(error)

    # --- sampling ------------------------------------------------------------------------------
    def _sample_and_emit(self, logits: torch.Tensor, rows: list[_Row], added: _AddedLogits | None = None) -> None:
        logits = logits.float()
        greedy = logits.argmax(dim=-1).tolist()
        finished: list[_Row] = []
        failed: list[tuple[_Row, BaseException]] = []
        for i, row in enumerate(rows):
            try:  # sampling is per row: a row that fails here fails alone
                row_logits = logits[i]
                masked = row.vocab is not None and added is not None
                if row.vocab is not None and added is not None:
                    # masked to the row's vocabulary: the base's tokens and its own module's added
                    # ones, indexed by its module ids (another module's tokens are not in it)
                    row_logits = added.row_view(row_logits, i, row.vocab)
                if row.generator is not None:
                    token = _sample(row_logits, row.params.temperature, row.params.top_p, row.generator, row.handle.id)
                else:
                    token = int(row_logits.argmax()) if masked else greedy[i]
                self._advance(row, token)
            except Exception as exc:  # noqa: BLE001 - the row fails with it, alone
                failed.append((row, exc))
                continue
            if row.finish_reason is not None:
                finished.append(row)
        index_of = {id(r): i for i, r in enumerate(self._rows)}
        for row in finished:
            self._complete(row)
        for row, error in failed:
            self._fail_row(row, error, during="sampling")
        leaving = finished + [row for row, _ in failed]
        self._retire([index_of[id(r)] for r in leaving if id(r) in index_of])

    def _advance(self, row: _Row, token: int) -> None:
        if row.handle.cancelled:
            row.finish_reason = "cancelled"
            return
        if token in row.stop_ids:
            row.finish_reason = "stop"
            return
        row.generated.append(token)
        tokenizer = self.tokenizer if row.vocab is None else row.vocab.tokenizer
        text = tokenizer.decode(row.generated, skip_special_tokens=True)
        stop_at = _find_stop(text, row.params.stop)
        if stop_at is not None:
            text = text[:stop_at]
            row.finish_reason = "stop"
        elif len(row.generated) >= row.params.max_tokens or row.next_position + 1 >= self.base.max_positions:
            row.finish_reason = "length"
        safe = streamable_length(text, row.params.stop, final=row.finish_reason is not None)
        delta = text[len(row.emitted_text) : safe] if safe > len(row.emitted_text) else ""
        row.emitted_text += delta
        row.final_text = text
        row.handle._emit(TokenEvent(token_id=token, text=delta))

    def _complete(self, row: _Row) -> None:
        self._release(row)
        text = row.final_text
        if len(text) > len(row.emitted_text) and text.startswith(row.emitted_text):
            rest = text[len(row.emitted_text) :]
            row.emitted_text = text
            row.handle._emit(TokenEvent(token_id=-1, text=rest))
        row.handle._finish(
            GenerationResult(
                request_id=row.handle.id,
                text=row.emitted_text,
                token_ids=list(row.generated),
                finish_reason=row.finish_reason or "stop",
                module=row.handle.module_key,
                prompt_tokens=len(row.prompt_ids),
                completion_tokens=len(row.generated),
            )
        )


class _AddedLogits:
    """A batch's logits for the added tokens of its tokenizer modules: (rows, positions, columns),
    each module's columns side by side (where ``columns`` says)."""

    def __init__(self, logits: torch.Tensor, columns: dict[int, int]):
        self.logits = logits
        self.columns = columns

    def row_view(self, base_logits: torch.Tensor, row: int, vocab: Any, positions: slice | int = -1) -> torch.Tensor:
        """Row ``row``'s logits over its own vocabulary, indexed by module ids: the base's
        tokens (``base_logits``' first ``base_vocab`` columns; the head's padding columns are
        no tokens of it) and its module's added tokens, nothing else."""
        start = self.columns[id(vocab)]
        own = self.logits[row, positions, start : start + vocab.added]
        return torch.cat([base_logits[..., : vocab.base_vocab], own.to(base_logits.dtype)], dim=-1)


def chat_ids(tokenizer: Any, messages: Any, owner: str = "the base") -> list[int]:
    """``messages`` rendered with ``tokenizer``'s chat template (with the assistant's turn opened)
    and tokenised. Raises InvalidRequest when the tokenizer has no template or the template
    refuses the messages."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequest(f"{owner} has no chat template; use /v1/completions")
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception as exc:  # noqa: BLE001 - jinja raises on roles the template refuses
        raise InvalidRequest(f"the chat template refused these messages: {exc}") from None
    # the template writes the special tokens (bos, eos) itself
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class _GrowingLayer(DynamicLayer):
    """A key/value cache layer with reserved room: a decode step writes its keys and values in
    place, where transformers' DynamicLayer concatenates (copying the whole layer every step).
    ``keys``/``values`` are views of the filled part, so attention and masks see the usual shapes."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        batch, heads, length, dim = keys.shape
        self._keys = keys.new_empty(batch, heads, length + room, dim)
        self._values = values.new_empty(batch, heads, length + room, values.shape[-1])
        self._keys[:, :, :length] = keys
        self._values[:, :, :length] = values
        self._length = length
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._expose()

    def _expose(self) -> None:
        self.keys = self._keys[:, :, : self._length]
        self.values = self._values[:, :, : self._length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        new = key_states.shape[-2]
        end = self._length + new
        if end > self._keys.shape[2]:
            capacity = max(end, 2 * self._keys.shape[2])
            for name in ("_keys", "_values"):
                old = getattr(self, name)
                grown = old.new_empty(old.shape[0], old.shape[1], capacity, old.shape[3])
                grown[:, :, : self._length] = old[:, :, : self._length]
                setattr(self, name, grown)
        self._keys[:, :, self._length : end] = key_states
        self._values[:, :, self._length : end] = value_states
        self._length = end
        self._expose()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length

    def truncate(self, length: int) -> None:
        """Forget what was written past ``length`` (the next update overwrites it)."""
        self._length = min(self._length, length)
        self._expose()


def _growing_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], room: int) -> Any:
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layers = [_GrowingLayer(k, v, room) for k, v in kv]
    return cache


def _cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, width: int):
    extra = width - mask.shape[1]
    if extra <= 0:
        return kv, mask
    pad_mask = torch.zeros(mask.shape[0], extra, dtype=mask.dtype, device=mask.device)
    padded = []
    for k, v in kv:
        zeros = torch.zeros(k.shape[0], k.shape[1], extra, k.shape[3], dtype=k.dtype, device=k.device)
        padded.append((torch.cat([zeros, k], dim=2), torch.cat([zeros, v], dim=2)))
    return padded, torch.cat([pad_mask, mask], dim=1)


def _sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator, request_id: str = "") -> int:
    scaled = logits / temperature
    if not bool(torch.isfinite(scaled).all()):
        raise NonFiniteLogits(
            f"request {request_id}: the logits are not finite (NaN or Inf) at temperature {temperature:g}, so no token can"
            " be sampled; the module's weights (or this temperature) overflow. Greedy decoding (temperature 0) still answers"
        )
    if top_p < SAMPLING_EPSILON:  # a nucleus that small holds the most likely token alone
        return int(scaled.argmax())
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        cumulative = sorted_probs.cumsum(0)
        keep = cumulative - sorted_probs < top_p  # always keeps the most likely token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def streamable_length(text: str, stops: list[str], *, final: bool) -> int:
    """How much of ``text`` (a row's whole decoded text so far) a stream may send: all of it once
    the row is finished; else not the end that could still become a stop string, nor a trailing
    U+FFFD, which a byte-level token that ends inside a UTF-8 character decodes to until the next
    token completes it (so the streamed text equals the full decode, byte for byte)."""
    if final:
        return len(text)
    return min(len(text) - _partial_stop(text, stops), len(text.rstrip("\ufffd")))


def _find_stop(text: str, stops: list[str]) -> int | None:
    positions = [text.find(s) for s in stops if s]
    positions = [p for p in positions if p >= 0]
    return min(positions) if positions else None


def _partial_stop(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                best = max(best, n)
                break
    return best


class _NoSource:
    def resolve(self, ref: Any) -> Any:
        from tunehub.errors import ModuleNotFound

        raise ModuleNotFound(f"no registry is configured; cannot load {ref}")

    def pull(self, ref: Any, dest: Any = None) -> Any:
        return self.resolve(ref)
