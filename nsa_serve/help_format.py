"""The subcommands' help formatter: each option's default appended to its help, as argparse's
ArgumentDefaultsHelpFormatter does, but only where it says something.

argparse's own appends "(default: X)" to every option, so an option whose help already states its
default in words ("context length (default: the model's)") read "(default: the model's) (default:
None)", and required options "(default: None)" too."""

import argparse
import re

# The help states its own default: "(default: …", "; default …", "default: …" at its start.
_STATES_DEFAULT = re.compile(r"(^|[(;,]\s*)default\b", re.IGNORECASE)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" unless the option is required, has no default (None or an empty
    string) or its help already names one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.required or action.default in (None, "") or action.default is argparse.SUPPRESS
                or _STATES_DEFAULT.search(text)):
            return text
        return super()._get_help_string(action)
