# Generated code lives below; regenerate with `make protos`.
