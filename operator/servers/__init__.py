"""Network servers of the operator: the certificate signing service and the policy distribution service."""
