"""Operations: job submission to a Ray cluster and the local dev stack. Never imported by workers."""
