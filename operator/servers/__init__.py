"""Network servers of the operator: the certificate signing service."""
