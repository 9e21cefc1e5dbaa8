"""Built-in extraction schemas: what ``--task extract --schema NAME`` asks the model to fill in.

Plain pydantic models, importable without torch or Ray. Descriptions matter: they become
the extraction prompt.
"""

from __future__ import annotations

import datetime as dt

from pydantic import BaseModel, ConfigDict, Field

Currency = Field(None, pattern=r"^[A-Z]{3}$", description="ISO 4217 currency code, e.g. EUR, USD.")


class _Schema(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Party(_Schema):
    name: str | None = Field(None, description="Name of the company or person.")
    address: str | None = Field(None, description="Postal address, one line.")
    tax_id: str | None = Field(None, description="VAT or tax identification number.")


class LineItem(_Schema):
    description: str = Field(description="What was sold.")
    quantity: float | None = Field(None, ge=0, description="Number of units.")
    unit_price: float | None = Field(None, description="Price of one unit.")
    amount: float | None = Field(None, description="Line total.")


class Invoice(_Schema):
    """An invoice: who bills whom, for what, and how much."""

    invoice_number: str | None = Field(None, description="The invoice's number or reference.")
    issue_date: dt.date | None = Field(None, description="Date the invoice was issued (YYYY-MM-DD).")
    due_date: dt.date | None = Field(None, description="Date payment is due (YYYY-MM-DD).")
    vendor: Party | None = Field(None, description="Who issued the invoice.")
    customer: Party | None = Field(None, description="Who is billed.")
    currency: str | None = Currency
    line_items: list[LineItem] = Field(default_factory=list, description="One entry per billed line.")
    subtotal: float | None = Field(None, description="Total before tax.")
    tax: float | None = Field(None, description="Tax amount.")
    total: float | None = Field(None, description="Amount due, tax included.")


class Receipt(_Schema):
    """A till receipt from a shop, restaurant or service."""

    merchant: Party | None = Field(None, description="The shop or business.")
    date: dt.date | None = Field(None, description="Date of purchase (YYYY-MM-DD).")
    currency: str | None = Currency
    items: list[LineItem] = Field(default_factory=list, description="Items bought.")
    subtotal: float | None = Field(None, description="Total before tax.")
    tax: float | None = Field(None, description="Tax amount.")
    total: float | None = Field(None, description="Amount paid.")
    payment_method: str | None = Field(None, description="Cash, card, ...")


class KeyValue(_Schema):
    key: str = Field(description="A label as printed, e.g. 'Policy number'.")
    value: str = Field(description="The value printed next to it.")


class KeyValues(_Schema):
    """Every labelled value on the document, as printed."""

    pairs: list[KeyValue] = Field(default_factory=list, description="Label and value pairs, in reading order.")


BUILTIN_SCHEMAS: dict[str, type[BaseModel]] = {"invoice": Invoice, "receipt": Receipt, "key_values": KeyValues}
