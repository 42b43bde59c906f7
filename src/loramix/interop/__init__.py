"""Interop with other X-LoRA implementations and formats: PEFT, mistral.rs / original X-LoRA, static LoRA."""

from .mistralrs import ExportError, export_mistralrs, import_xlora
from .peft import from_peft, to_peft
from .static import export_static

__all__ = ["ExportError", "export_mistralrs", "export_static", "from_peft", "import_xlora", "to_peft"]
