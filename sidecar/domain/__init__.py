"""Pure decision logic of the agent: tokens, rules, decisions. No I/O."""
