"""Edit requests from benchmark files: ZsRE, CounterFact, EasyEdit, WikiBigEdit, KnowEdit, plain.

Usage::

    result = load_requests("data/zsre_mend_eval.json")          # format detected
    result = load_requests("qa.csv", field_map={"prompt": "question", "target_new": "answer"})
    save_requests(result.requests, "edits.json")                # our "plain" form, round-trips
"""

from locft_jax.data.formats import FORMATS, detect_format
from locft_jax.data.loading import LoadResult, load_requests, load_texts, request_to_record, save_requests
from locft_jax.requests import EditRequest, RequestError

__all__ = [
    "FORMATS",
    "EditRequest",
    "LoadResult",
    "RequestError",
    "detect_format",
    "load_requests",
    "load_texts",
    "request_to_record",
    "save_requests",
]
