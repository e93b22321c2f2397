"""``/v1/files`` and ``/v1/batches``: OpenAI's batch workflow over the daemon's durable store.
No torch.

Workflow (what the openai SDK does)::

    POST /v1/files (multipart: file, purpose=batch)      → File {"id": "file-…"}
    POST /v1/batches {input_file_id, endpoint, completion_window, metadata}  → Batch
    GET  /v1/batches/{id} … until status is completed / failed / expired / cancelled
    GET  /v1/files/{output_file_id}/content              → the output JSONL
    POST /v1/batches/{id}/cancel,  GET /v1/batches?limit&after,  GET/DELETE /v1/files/{id}

Every store call runs in a thread and is scoped to the caller's tenant: another tenant's
file or batch is a 404 exactly like an unknown id. An upload that would take the tenant over its
``storage-quota-gb`` is refused with 413 as soon as its bytes pass the quota (nothing is kept);
``completion_window`` must be one the site grants (``BatchPolicy``). Uploads are streamed to a spooled temp
file (memory up to 8 MiB, then disk) and handed to ``store.create_file``; downloads are
served from the stored file. Batch objects are the store's minus its private fields (paths,
tenant). Creating or cancelling a batch wakes the router's feeder.
"""

from __future__ import annotations

import asyncio
import tempfile

from aiohttp import web

from hpcserve.api.admission import ApiError, api_error
from hpcserve.api.batch_api import check_metadata
from hpcserve.api.openai_http.server import read_json
from hpcserve.batch.openai_format import URLS
from hpcserve.daemon.batch_schema import BatchNotFound
from hpcserve.daemon.files import StorageQuotaExceeded
from hpcserve.errors import HpcserveError, RequestError

SPOOL_BYTES = 8 << 20
MAX_LIST_LIMIT = 100
_PRIVATE = ("tenant", "input_file", "output_file", "error_file")


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_post("/v1/files", create_file)
    r.add_get("/v1/files", list_files)
    r.add_get("/v1/files/{file_id}", get_file)
    r.add_delete("/v1/files/{file_id}", delete_file)
    r.add_get("/v1/files/{file_id}/content", file_content)
    r.add_post("/v1/batches", create_batch)
    r.add_get("/v1/batches", list_batches)
    r.add_get("/v1/batches/{batch_id}", get_batch)
    r.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)


async def _store(request: web.Request, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` of the store in a thread; store errors become ``ApiError``."""
    from hpcserve.daemon.files import FileNotFound

    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except BatchNotFound as exc:
        raise ApiError("not_found", f"no batch with id {exc.batch_id!r}; GET /v1/batches lists yours",
                       param="batch_id") from None
    except FileNotFound as exc:
        raise ApiError("not_found", f"no file with id {exc.file_id!r}; GET /v1/files lists yours",
                       param="file_id") from None
    except HpcserveError as exc:
        raise api_error(exc) from None


def _tenant(request: web.Request) -> str:
    return request["principal"].tenant


def _batch_object(d: dict) -> dict:
    out = {k: v for k, v in d.items() if k not in _PRIVATE}
    out.setdefault("object", "batch")
    return out


def _limit(request: web.Request, default: int, most: int) -> int:
    raw = request.query.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= most:
        raise ApiError("invalid_argument", f"limit: must be an integer 1..{most}, got {raw!r}", param="limit")
    return int(raw)


# ---------------------------------------------------------------------- files
async def create_file(request: web.Request) -> web.Response:
    if not request.content_type.startswith("multipart/"):
        raise ApiError("invalid_argument", "POST /v1/files takes multipart/form-data with fields file and "
                       "purpose (e.g. client.files.create(file=open('in.jsonl', 'rb'), purpose='batch'))")
    gw = request.app["gateway"]
    store, principal = gw.store, request["principal"]
    quota = gw.policy.quota_bytes(principal)
    left = quota - await _store(request, store.stored_bytes, principal.tenant) if quota else None
    purpose, filename = None, None
    spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 - closed below
    try:
        reader = await request.multipart()
        async for part in reader:
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file":
                filename = part.filename or "upload.jsonl"
                size = 0
                while chunk := await part.read_chunk(1 << 20):
                    size += len(chunk)
                    if left is not None and size > left:  # stop reading: the quota is checked before the disk
                        raise api_error(StorageQuotaExceeded(principal.tenant, quota, quota - left, size))
                    await asyncio.to_thread(spool.write, chunk)
            else:
                await part.release()
        if filename is None:
            raise ApiError("invalid_argument", "file: required (the JSONL file, as a multipart file field)",
                           param="file")
        if not purpose:
            raise ApiError("invalid_argument", 'purpose: required; use "batch" for batch input', param="purpose")
        spool.seek(0)
        obj = await _store(request, store.create_file, spool, filename, purpose, _tenant(request), quota_bytes=quota)
    finally:
        spool.close()
    return web.json_response(obj)


async def list_files(request: web.Request) -> web.Response:
    store = request.app["gateway"].store
    limit = _limit(request, 10000, 10000)
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError("invalid_argument", f"order: must be asc or desc, got {order!r}", param="order")
    rows = await _store(request, store.list_files, tenant=_tenant(request), purpose=request.query.get("purpose"),
                        limit=limit + 1, after=request.query.get("after"), order=order)
    data = rows[:limit]
    return web.json_response({"object": "list", "data": data, "has_more": len(rows) > limit,
                              "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None})


async def get_file(request: web.Request) -> web.Response:
    store = request.app["gateway"].store
    return web.json_response(await _store(request, store.get_file, request.match_info["file_id"],
                                          tenant=_tenant(request)))


async def delete_file(request: web.Request) -> web.Response:
    store = request.app["gateway"].store
    return web.json_response(await _store(request, store.delete_file, request.match_info["file_id"],
                                          tenant=_tenant(request)))


async def file_content(request: web.Request) -> web.StreamResponse:
    store = request.app["gateway"].store
    path = await _store(request, store.file_path, request.match_info["file_id"], tenant=_tenant(request))
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


# ---------------------------------------------------------------------- batches
async def create_batch(request: web.Request) -> web.Response:
    gw = request.app["gateway"]
    body = await read_json(request)
    unknown = set(body) - {"input_file_id", "endpoint", "completion_window", "metadata", "output_expires_after"}
    if unknown:
        raise ApiError("invalid_argument", f"{min(unknown)}: unknown field for POST /v1/batches; "
                       "give input_file_id, endpoint, completion_window and optionally metadata")
    fid, endpoint = body.get("input_file_id"), body.get("endpoint")
    window = body.get("completion_window")
    metadata = body.get("metadata")
    if not isinstance(fid, str) or not fid:
        raise ApiError("invalid_argument", "input_file_id: required (the id POST /v1/files returned)",
                       param="input_file_id")
    if endpoint not in URLS:
        raise ApiError("invalid_argument", f"endpoint: must be one of {', '.join(URLS)}; got {endpoint!r}",
                       param="endpoint")
    try:
        window = gw.policy.window(window)
    except HpcserveError as exc:
        raise ApiError("invalid_argument", str(exc), param="completion_window") from None
    if metadata is not None:
        try:
            metadata = check_metadata(metadata)
        except RequestError as exc:
            raise api_error(exc) from None
    tenant = _tenant(request)
    info = await _store(request, gw.store.get_file, fid, tenant=tenant)
    if info.get("purpose") != "batch":
        raise ApiError("invalid_argument", f"input_file_id: file {fid} has purpose {info.get('purpose')!r}; "
                       'upload the batch input with purpose "batch"', param="input_file_id")
    path = await _store(request, gw.store.file_path, fid, tenant=tenant)
    batch = await _store(request, gw.store.create_batch, path, window, metadata or None, tenant=tenant,
                         endpoint=endpoint, input_file_id=fid)
    gw.admission.router.wake()
    return web.json_response(_batch_object(batch))


async def get_batch(request: web.Request) -> web.Response:
    store = request.app["gateway"].store
    return web.json_response(_batch_object(await _store(request, store.get_batch, request.match_info["batch_id"],
                                                        tenant=_tenant(request))))


async def cancel_batch(request: web.Request) -> web.Response:
    gw = request.app["gateway"]
    batch = await _store(request, gw.store.cancel_batch, request.match_info["batch_id"], tenant=_tenant(request))
    gw.admission.router.wake()
    return web.json_response(_batch_object(batch))


async def list_batches(request: web.Request) -> web.Response:
    store = request.app["gateway"].store
    limit = _limit(request, 20, MAX_LIST_LIMIT)
    rows = await _store(request, store.list_batches, limit + 1, request.query.get("after") or None,
                        tenant=_tenant(request))
    data = [_batch_object(d) for d in rows[:limit]]
    return web.json_response({"object": "list", "data": data, "has_more": len(rows) > limit,
                              "first_id": data[0]["id"] if data else None,
                              "last_id": data[-1]["id"] if data else None})
