"""Initialisation methods for the rows a target vocabulary adds."""

from .registry import (METHODS, Method, MethodInputs, MethodResult, TransplantContext, available_methods, get_method,
                       register, resource)

__all__ = ["METHODS", "Method", "MethodInputs", "MethodResult", "TransplantContext", "available_methods",
           "get_method", "register", "resource"]
