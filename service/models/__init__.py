"""The served models. Adding one means a module here, one in training/, and one line in PREDICTORS."""

from service.models.base import Predictor
from service.models.fashion import Fashion
from service.models.house_price import HousePrice
from service.models.phone_price import PhonePrice
from service.models.poem import Poem

PREDICTORS: list[type[Predictor]] = [PhonePrice, HousePrice, Poem, Fashion]
