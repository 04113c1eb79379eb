"""Label Studio logic: the label config, what to ask for each task, answers into regions, results."""
