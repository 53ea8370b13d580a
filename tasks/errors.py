"""Errors every stage shares, mapped to exit codes by tasks.cli."""


class InputError(Exception):
    """Bad input from the user (dataset, params, files). Exit code 2, one line per problem."""

    def __init__(self, problems: str | list[str]):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class QualityGateError(Exception):
    """The winner did not pass the quality gate: nothing is promoted. Exit code 3."""
