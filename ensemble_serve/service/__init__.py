"""What a request does: which model it names, who answers (plan), the fan-out, the vote, the response. Online only."""
