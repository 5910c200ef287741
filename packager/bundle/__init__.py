"""Stage 5, bundle: the atomic writer and the verifier. Knows files and hashes, not how the files were made."""
