from ._base import AbstractRule as AbstractRule
from .procrustes import Procrustes as Procrustes
from .quad import Quad as Quad
