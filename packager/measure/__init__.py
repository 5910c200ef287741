"""Stage 7, measure: bench (fresh process per repetition), the device matrix and its report, quality (KLD, PPL)."""
