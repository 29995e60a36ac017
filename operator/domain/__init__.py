"""Pure logic of the operator: the mesh CA, CSR checks, issuance. No I/O."""
