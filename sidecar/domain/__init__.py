"""Pure decision logic of the agent: tokens, rules, decisions, certificates, the Envoy bootstrap. No I/O."""
