"""Initialisation methods for the rows a target vocabulary adds."""

from .registry import METHODS, Method, MethodInputs, MethodResult, available_methods, get_method, register

__all__ = ["METHODS", "Method", "MethodInputs", "MethodResult", "available_methods", "get_method", "register"]
