"""Conversions between the gRPC messages and the engine's types. No torch.

- ``sampling_from_proto(pb, default_max_tokens)``: a client's ``SamplingParams`` message to a
  validated ``engine.request.SamplingParams`` (``RequestError`` names the bad field). Unset
  optional fields take the server's defaults: temperature 1.0 (OpenAI's), no filters, and
  ``max_tokens = default_max_tokens``.
- ``sampling_to_proto(params)``: the inverse, with every field set (daemon → worker).
- ``logprobs_to_proto`` / ``logprobs_from_proto``: ``TokenLogprob`` lists.
- ``finish_reason_to_proto`` / ``finish_reason_from_proto``: "stop" | "length" | "abort" | "error".
"""

from __future__ import annotations

from hpcserve.api.v1 import serving_pb2 as pb
from hpcserve.engine.request import SamplingParams, TokenLogprob
from hpcserve.errors import RequestError

_FINISH = {"stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH, "abort": pb.FINISH_REASON_ABORT,
           "error": pb.FINISH_REASON_ERROR}
_FINISH_BACK = {v: k for k, v in _FINISH.items()}

# Limits on what a client may send, checked before the engine sees it.
MAX_STOP_TOKEN_IDS = 64


def sampling_from_proto(m: pb.SamplingParams, default_max_tokens: int) -> SamplingParams:
    def opt(name: str, default):
        return getattr(m, name) if m.HasField(name) else default

    if len(m.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise RequestError(f"sampling_params.stop_token_ids: at most {MAX_STOP_TOKEN_IDS} ids, "
                           f"got {len(m.stop_token_ids)}", field="stop_token_ids")
    try:
        return SamplingParams(
            max_tokens=opt("max_tokens", default_max_tokens),
            temperature=opt("temperature", 1.0),
            top_p=opt("top_p", 1.0),
            top_k=opt("top_k", 0),
            min_p=opt("min_p", 0.0),
            seed=opt("seed", None),
            stop=list(m.stop),
            stop_token_ids=list(m.stop_token_ids),
            ignore_eos=m.ignore_eos,
            logprobs=opt("logprobs", None),
        )
    except RequestError as exc:
        raise RequestError(f"sampling_params.{exc}", field=exc.field, code=exc.code) from None


def sampling_to_proto(p: SamplingParams) -> pb.SamplingParams:
    m = pb.SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                          min_p=p.min_p, stop=p.stop, stop_token_ids=p.stop_token_ids, ignore_eos=p.ignore_eos)
    if p.seed is not None:
        m.seed = p.seed
    if p.logprobs is not None:
        m.logprobs = p.logprobs
    return m


def logprobs_to_proto(lps: list[TokenLogprob], decode=None) -> list[pb.TokenLogprob]:
    out = []
    for t in lps:
        m = pb.TokenLogprob(token_id=t.token_id, logprob=t.logprob,
                            top=[pb.TopLogprob(token_id=tid, logprob=lp, token=decode(tid) if decode else "")
                                 for tid, lp in t.top])
        if decode:
            m.token = decode(t.token_id)
        out.append(m)
    return out


def logprobs_from_proto(ms) -> list[TokenLogprob]:
    return [TokenLogprob(m.token_id, m.logprob, [(x.token_id, x.logprob) for x in m.top]) for m in ms]


def finish_reason_to_proto(reason: str | None) -> int:
    return _FINISH.get(reason or "", pb.FINISH_REASON_UNSPECIFIED)


def finish_reason_from_proto(value: int) -> str | None:
    return _FINISH_BACK.get(value)
