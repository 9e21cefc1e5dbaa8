"""docpipe's output contract: pydantic row models and the matching Arrow schemas.

Importable without torch or Ray, so lake readers and tests can depend on it alone.
"""

from docpipe.schemas.contract import (
    BLOCK_TYPE,
    CONTRACT_VERSION,
    DOCUMENTS_SCHEMA,
    EXTRACTION_COLUMNS,
    FURNITURE,
    PAGES_SCHEMA,
    Block,
    BlockKind,
    DocumentRow,
    DocumentStatus,
    ErrorType,
    FinishReason,
    PageRow,
    PageStatus,
    Renderer,
    RouteReason,
    RunManifest,
    TextLayerAnalysis,
    TextSource,
)

__all__ = [
    "BLOCK_TYPE",
    "CONTRACT_VERSION",
    "DOCUMENTS_SCHEMA",
    "EXTRACTION_COLUMNS",
    "FURNITURE",
    "PAGES_SCHEMA",
    "Block",
    "BlockKind",
    "DocumentRow",
    "DocumentStatus",
    "ErrorType",
    "FinishReason",
    "PageRow",
    "PageStatus",
    "Renderer",
    "RouteReason",
    "RunManifest",
    "TextLayerAnalysis",
    "TextSource",
]
