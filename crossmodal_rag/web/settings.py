"""The server's settings: limits, models and serving knobs, one frozen record."""

from __future__ import annotations

from dataclasses import dataclass

from .guards import LOOPBACK_HOSTS
from .origins import normalize_origin

__all__ = ["WebSettings"]


@dataclass(frozen=True)
class WebSettings:
    """Limits, models and serving knobs of a server."""

    def __post_init__(self) -> None:
        if self.max_batch < 1 or not 0 <= self.batch_ms <= 1000 or self.max_queued_generations < 0:
            raise ValueError(f"max_batch must be >= 1, batch_ms in [0, 1000] and max_queued_generations >= 0; "
                             f"got {self.max_batch}, {self.batch_ms} and {self.max_queued_generations}")
        if (self.decode_workers < 1 or not 0 < self.decode_timeout_s <= 3600 or self.decode_memory_mb < 16
                or self.max_queued_decodes < 0):
            raise ValueError(f"decode_workers must be >= 1, decode_timeout_s in (0, 3600], decode_memory_mb >= 16 "
                             f"and max_queued_decodes >= 0; got {self.decode_workers}, {self.decode_timeout_s}, "
                             f"{self.decode_memory_mb} and {self.max_queued_decodes}")
        object.__setattr__(self, "allowed_origins", tuple(normalize_origin(o) for o in self.allowed_origins))
        object.__setattr__(self, "shards", tuple(self.shards))

    collection: str  # collection folder (with shards: the first shard, which embeds the queries)
    shards: tuple[str, ...] = ()  # more collection folders searched with it as one (index shards)
    generator: str | None = None  # generator spec (default google/flan-t5-base)
    model: str | None = None  # encoder spec (default: the collection's)
    max_upload_bytes: int = 10 * 1024 * 1024  # largest accepted upload
    max_image_pixels: int = 50_000_000  # largest declared width*height of an upload
    max_query_chars: int = 1000  # longest text query, question or plus/minus text
    max_where_chars: int = 500  # longest --where expression
    max_where_conditions: int = 16  # most where conditions in one request
    max_json_bytes: int = 256 * 1024  # largest request body that is not an upload (JSON)
    max_k: int = 100  # largest k
    max_new_tokens: int = 64  # longest generated answer
    thumbnail_size: int = 256  # default thumbnail side
    thumbnail_dir: str | None = None  # thumbnail cache folder (default under ~/.cache)
    load_generator_at_startup: bool = True  # else on the first ask
    mmap: bool = False  # memory-map the index files instead of reading them into RAM
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS  # Host header names answered ("*": any)
    max_workers: int = 0  # searches/renders run at once in worker threads (0: CPUs, at most 8)
    show_paths: bool = False  # absolute server paths in responses (else relative to the source root)
    max_batch: int = 32  # concurrent searches embedded in one encoder forward (1: no batching)
    batch_ms: float = 2.0  # longest wait for more searches after the first of a batch arrives
    max_queued_generations: int = 8  # answers waiting behind the one being generated (more: 503)
    allowed_origins: tuple[str, ...] = ()  # other sites whose pages may POST here (scheme://host[:port])
    decode_workers: int = 2  # uploads and thumbnails decoded at once, each in a worker process
    decode_timeout_s: float = 10.0  # one decode's deadline; past it the worker is killed (422)
    decode_memory_mb: int = 1024  # address space a decode worker may use beyond its start-up
    max_queued_decodes: int = 8  # decodes waiting for a worker; more get 503 at once
