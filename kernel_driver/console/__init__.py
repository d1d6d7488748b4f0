"""The web console (`kernel-driver ui`): needs the ui extra (Flask, waitress, psycopg-pool)."""

from kernel_driver.console.command import ui

__all__ = ["ui"]
