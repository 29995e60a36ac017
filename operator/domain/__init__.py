"""Pure logic of the operator: the mesh CA, CSR checks, policy compilation, status, leases. No I/O."""
