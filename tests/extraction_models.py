"""User-defined extraction schemas, loaded by tests as 'tests.extraction_models:Class'."""

from pydantic import BaseModel, Field, field_validator


class PurchaseOrder(BaseModel):
    po_number: str | None = Field(None, description="Purchase order number.")
    supplier: str | None = Field(None, description="Supplier name.")
    quantities: list[int] = Field(default_factory=list, description="Ordered quantities.")


class AuditedTotal(BaseModel):
    """A schema whose custom validator no output passes: the grammar can't express it. The field is required,
    so every output carries it and the validator runs (it doesn't for a default)."""

    total: float | None = Field(description="Amount due.")

    @field_validator("total")
    @classmethod
    def must_be_confirmed(cls, value):
        raise ValueError("total must be confirmed by a second source")


NOT_A_MODEL = {"type": "object"}
