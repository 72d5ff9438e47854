from ._base import AbstractRule as AbstractRule, track_lipschitz as track_lipschitz
from .procrustes import Procrustes as Procrustes
from .quad import Quad as Quad
