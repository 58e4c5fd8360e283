"""One wrapper per custom kernel, each with its pure-MLX twin `<name>_ref` above it."""
