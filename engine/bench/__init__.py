"""The benchmark harness behind ``queue-engine bench``: every contender on the
same workload in the same run, delivery verified, medians and ratios reported."""
