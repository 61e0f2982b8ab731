"""The task engine: the task model, the live board, the queue's rule, workers, delivery, approvals and recovery."""
