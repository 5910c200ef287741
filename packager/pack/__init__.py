"""The pipeline: compose source, spec, plan, convert and bundle into `pack model`, auto-quant and the matrix run."""
